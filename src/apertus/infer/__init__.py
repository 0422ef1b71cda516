"""Inference: the engine (paged KV cache, continuous batching, streaming) and its sampler."""

from .engine import Engine, EngineBusy
from .request import Delta, Request
from .sampler import SamplingParams

__all__ = ["Delta", "Engine", "EngineBusy", "Request", "SamplingParams"]
