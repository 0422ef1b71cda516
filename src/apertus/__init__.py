"""apertus: the Apertus LLM system, open end to end."""

from .checkpoint import load_model, save_model
from .config import PRESETS, ApertusConfig, preset
from .model import Apertus, build_model

__version__ = "0.1.0"
__all__ = ["Apertus", "ApertusConfig", "PRESETS", "build_model", "load_model", "preset", "save_model"]
