"""Inference: the engine (paged KV cache, continuous batching, streaming) and its sampler."""

from .engine import Delta, Engine, EngineBusy, Request
from .sampler import SamplingParams

__all__ = ["Delta", "Engine", "EngineBusy", "Request", "SamplingParams"]
