"""apertus: the Apertus LLM system, open end to end."""

import os

# PyTorch's CPU allocator puts buffers of 2 MB and more on transparent huge pages when this is set (pytorch#115990),
# read when torch loads: set here, before it does. Training and inference allocate and free large temporaries (256
# rows of logits over a 131k vocabulary are 128 MB in fp32) every step, and faulting them in 4 KB pages cost ~4x the
# time of a copy into them (measured on a 2-core VM). Set THP_MEM_ALLOC_ENABLE=0 to keep 4 KB pages.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .checkpoint import load_model, save_model
from .config import PRESETS, ApertusConfig, preset
from .model import Apertus, build_model

__version__ = "0.1.0"
__all__ = ["Apertus", "ApertusConfig", "PRESETS", "build_model", "load_model", "preset", "save_model"]
