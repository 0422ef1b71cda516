"""apertus: the Apertus LLM system, open end to end."""

import os
import sys

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


def _keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for the next allocation instead of returning it to the kernel.

    By default glibc maps every buffer of 32 MB and more afresh and unmaps it at free, so a training step's logits and
    gradients are faulted in and zeroed by the kernel again at every step. On a VM whose balloon reports free pages
    to the host (Firecracker, many cloud VMs) each fault also goes to the host: a 150M-parameter step at the 131k
    vocabulary took 8.1 s instead of 3.9 s on a 2-core VM. With mmap off and no trimming, freed buffers stay in the
    heap, as PyTorch's CUDA caching allocator keeps them on GPUs; the process keeps its peak memory (7.7 GB
    against 7.5 there). APERTUS_KEEP_FREED_MEMORY=0 leaves malloc as it is."""
    if os.environ.get("APERTUS_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc only (musl has no mallopt)
    except (AttributeError, OSError):
        return
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, -1)  # read as SIZE_MAX: never trim


_keep_freed_memory()
