"""int8 and int4 weights for CPU decoding.

Single-stream decoding on a CPU reads every weight once per token, so it is bound by memory bandwidth: int8 weights
read a quarter of fp32's bytes, int4 an eighth (plus a bf16 scale and zero point per group). The matmuls are PyTorch's
own kernels: int8 by int8 (`torch._int_mm`, oneDNN) with activations quantized per row where the CPU has int8 dot
products (see Int8Linear), else the weight-only `_weight_int8pack_mm` (the one gpt-fast uses); int4 is weight-only
(`_weight_int4pack_mm_for_cpu`, torchao's CPU int4 layout). The weight-only kernels are fast only with bf16
activations: with fp32 activations they fall back to a generic loop 5-15x slower (measured on a 2-core AVX2 machine
without bf16 matrix units), so the input is cast to bf16 and the output back, whatever the model's dtype. With many
rows (prefill) they are slower than an fp32 GEMM (int4: 2-3x at 512 rows; still ~3x faster than a bf16 GEMM without
bf16 units), so quantizing is an option for batch-1 use, not the default; the int8 GEMM suffers less (512 rows of a
2048 x 10752 layer: 35 ms against the weight-only kernel's 76 ms).

int4 is asymmetric per group of `group_size` input features along each output row: 16 levels evenly spaced from the
group's minimum to its maximum (w ~ (q - 8) * scale + zero, with q in 0..15, as the kernel computes it).

Quantizing takes a while (1.44B parameters: 2-3 s for int8, 4-5 s for int4 on 2 cores; the 8B 19 s and 28 s), so the
layers are kept in a .safetensors file under cache_file()'s folder: a later start maps them instead (well under a
second), the way `--compile` keeps its graphs. The file is named by the checkpoint's files (path, size, modification
time), the dtype, the mode, the group size and torch's version (the int4 packing is torch's), so a changed checkpoint is
quantized anew.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..util import atomic_write

INT4_GROUP_SIZE = 32  # Q4_0's block; 64 and 128 read slightly fewer bytes at a higher KL (docs/models.md)
CACHE_FORMAT = "1"  # raised whenever a layer's buffers change


@functools.cache
def has_int8_dot() -> bool:
    """Whether this CPU has AVX512-VNNI, int8 dot products (every CPU with AMX has it too; AVX-VNNI alone is not
    detected and keeps the weight-only kernel). With it, oneDNN's int8 GEMM (`torch._int_mm`) reads the weights of a
    one-row product ~1.7x faster than the weight-only kernel; without it (oneDNN limited to AVX2), ~2x slower."""
    return bool(torch.cpu.get_capabilities().get("avx512_vnni", False))


class Int8Linear(nn.Module):
    """Symmetric int8 weights, one scale per output row.

    Where the CPU has int8 dot products (`has_int8_dot`), the activations are quantized too: per row, symmetric, at
    each call (W8A8, as llama.cpp's Q8_0 multiplies its weights by activations quantized to 8 bits), and
    `torch._int_mm` sums the products exactly in int32, so a row's result does not depend on the other rows of the
    batch. Elsewhere the activations stay bf16 (`_weight_int8pack_mm`, weight-only)."""

    def __init__(self, linear: nn.Linear, int8_activations: bool | None = None):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("int8: linear layers with bias are not supported (Apertus has none)")
        w = linear.weight.detach().to(torch.float32, copy=True)  # a copy, worked on in place (start-up time)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", w.mul_(1 / scale[:, None]).round_().to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.out_features = linear.out_features
        self.int8_activations = has_int8_dot() if int8_activations is None else int8_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_activations:
            flat = x.reshape(-1, x.shape[-1]).float()
            step = flat.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
            y = torch._int_mm((flat / step).round_().to(torch.int8), self.weight.T).float() * step * self.scale.float()
        else:
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), self.weight, self.scale)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class Int4Linear(nn.Module):
    """Group-wise asymmetric int4 weights packed for `_weight_int4pack_mm_for_cpu`."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("int4: linear layers with bias are not supported (Apertus has none)")
        n, k = linear.weight.shape
        if k % group_size:
            raise ValueError(f"int4: in_features {k} is not a multiple of the group size {group_size}")
        # the kernel's packing wants a multiple of 16 output rows: zero rows are added and cut from the output
        rows = -n % 16
        w = linear.weight.detach().to(torch.float32, copy=True)  # a copy, worked on in place (start-up time)
        w = torch.cat([w, w.new_zeros(rows, k)]) if rows else w
        groups = w.reshape(n + rows, k // group_size, group_size)
        lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-10).to(torch.bfloat16)
        zero = (lo + 8 * scale.float()).to(torch.bfloat16)
        # rounded against the bf16 scale and zero the kernel will use, so their rounding costs no extra error
        q = groups.sub_(zero.float()).mul_(1 / scale.float()).add_(8).round_().clamp_(0, 15).to(torch.int32)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n + rows, k), 1))
        # [k / group_size, out rows, 2]: the kernel's layout, scale and zero of one group side by side
        self.register_buffer("scale_and_zero", torch.cat([scale, zero], -1).transpose(0, 1).contiguous())
        self.group_size, self.out_features = group_size, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.group_size, self.scale_and_zero)
        if y.shape[-1] != self.out_features:
            y = y[:, : self.out_features]
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


LAYERS = {"int8": Int8Linear, "int4": Int4Linear}  # mode -> the layer that replaces each nn.Linear
MODES = tuple(LAYERS)


def _linears(model: nn.Module, types=(nn.Linear,)) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, parent, attribute name) of every nn.Linear (or `types`): not the layers themselves, so that
    each one's float weights are freed as soon as it is replaced (holding them all would need the float model and the
    quantized one at once: 24 GB for the 8B in int8)."""
    return [(f"{path}.{name}" if path else name, parent, name) for path, parent in list(model.named_modules())
            for name, child in list(parent.named_children()) if isinstance(child, types)]


def _check_int4(model: nn.Module, group_size: int) -> None:
    for name, child in model.named_modules():
        if isinstance(child, nn.Linear) and child.in_features % group_size:
            raise ValueError(f"int4: layer {name} has in_features {child.in_features}, not a multiple "
                             f"of the group size {group_size}; use int8 (or a group size that divides it)")


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of the model (projections, MLP, lm_head) in place; embeddings and norms stay."""
    for _, parent, name in _linears(model):
        setattr(parent, name, Int8Linear(getattr(parent, name)))
    return model


def quantize_int4(model: nn.Module, group_size: int = INT4_GROUP_SIZE) -> nn.Module:
    """As quantize_int8, with Int4Linear. Every layer is checked before any is replaced, so a model that cannot be
    quantized is left as it was."""
    _check_int4(model, group_size)
    for _, parent, name in _linears(model):
        setattr(parent, name, Int4Linear(getattr(parent, name), group_size))
    return model


def cache_file(model_dir: str | os.PathLike, mode: str, dtype: torch.dtype | None = None) -> Path | None:
    """Where the `mode` layers of the checkpoint in `model_dir` (loaded in `dtype`) are kept between starts: a file
    in $APERTUS_QUANT_CACHE, else `$XDG_CACHE_HOME/apertus/quantized` (`~/.cache/apertus/quantized`); None when
    APERTUS_QUANT_CACHE is `off`. Its name changes with the checkpoint's files, the dtype, the mode, the group size
    and torch's version."""
    from ..checkpoint import weight_files
    from ..embedded import cache_root

    root = os.environ.get("APERTUS_QUANT_CACHE")
    if root == "off":
        return None
    model_dir = Path(model_dir).resolve()
    files = [(str(f.resolve()), st.st_size, st.st_mtime_ns) for f in weight_files(model_dir) for st in [f.stat()]]
    key = json.dumps([files, str(dtype), mode, INT4_GROUP_SIZE, torch.__version__, CACHE_FORMAT])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = Path(root).expanduser() if root else cache_root() / "quantized"
    return folder / f"{model_dir.name}-{mode}-{digest}.safetensors"


def _save_aligned(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    """The safetensors format (read back by the safetensors library), written so that every tensor starts at a multiple
    of 64 bytes of the file: the header is padded with spaces, as the format allows, and the tensors whose sizes are
    multiples of 64 come first. save_file aligns to 8 bytes only, and torch's weight-only kernels can crash on mapped
    weights that are not aligned (`_weight_int8pack_mm`, 256 x 128, torch 2.13)."""
    from ..checkpoint import SAFETENSORS_DTYPES

    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    order = sorted(tensors, key=lambda k: (tensors[k].nbytes % 64 != 0, k))
    header, offset = {"__metadata__": metadata}, 0
    for key in order:
        t = tensors[key]
        header[key] = dict(dtype=names[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + t.nbytes])
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)

    def write(tmp: Path):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for key in order:
                f.write(tensors[key].contiguous().view(-1).view(torch.uint8).numpy().data)

    atomic_write(file, write)


def _load_cached(model: nn.Module, mode: str, file: Path) -> bool:
    """Replace the model's linears by the quantized layers stored in `file`, as views of the mapped file; False, with
    the model untouched, when the file is missing, unreadable or was written for another model or mode."""
    if not file.is_file():
        return False
    try:
        f = safe_open(file, framework="pt")  # its tensors keep the mapping alive
        if (f.metadata() or {}).get("mode") != mode:
            return False
        stored = set(f.keys())
        layers = []
        for qualname, parent, name in _linears(model):
            linear = getattr(parent, name)
            with torch.device("meta"):  # the layer's shapes and dtypes, without computing anything
                shape = nn.Linear(linear.in_features, linear.out_features, bias=False)
                layer = LAYERS[mode](shape)
            keys = {k: f"{qualname}.{k}" for k in layer.state_dict()}
            if not stored.issuperset(keys.values()):
                return False
            tensors = {k: f.get_tensor(key) for k, key in keys.items()}
            # a misaligned tensor (a size not a multiple of 64 before it, in a small model) is copied: see _save_aligned
            layer.load_state_dict({k: t if t.data_ptr() % 64 == 0 else t.clone() for k, t in tensors.items()},
                                  assign=True)
            layers.append((parent, name, layer))
    except (SafetensorError, OSError, RuntimeError):  # RuntimeError: a tensor of another shape (load_state_dict)
        return False
    for parent, name, layer in layers:
        setattr(parent, name, layer)
    return True


def quantize_weights(model: nn.Module, mode: str) -> nn.Module:
    """`mode` "int8" or "int4": the model's linear layers in place, for CPU decoding."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not supported; use one of {', '.join(MODES)}")
    return quantize_int8(model) if mode == "int8" else quantize_int4(model)


def quantize_cached(model: nn.Module, mode: str, cache: str | os.PathLike) -> str:
    """quantize_weights(model, mode), the layers read from `cache` (a .safetensors path, see cache_file()) when it
    holds them, else written there after quantizing. Returns what it did and how long it took, in words."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not supported; use one of {', '.join(MODES)}")
    if mode == "int4":
        _check_int4(model, INT4_GROUP_SIZE)
    start, cache = time.perf_counter(), Path(cache)
    if _load_cached(model, mode, cache):
        return f"{mode} weights mapped from {cache} in {time.perf_counter() - start:.1f} s"
    quantize_weights(model, mode)
    how = f"quantized to {mode} in {time.perf_counter() - start:.1f} s"
    state = {f"{qualname}.{k}": t.contiguous() for qualname, parent, name in _linears(model, tuple(LAYERS.values()))
             for k, t in getattr(parent, name).state_dict().items()}
    try:
        _save_aligned(state, cache, {"mode": mode})
    except OSError as e:  # a full disk or a read-only folder costs the next start its time, nothing more
        return f"{how} (not kept for the next start: {e.strerror}: {cache})"
    return f"{how}, kept in {cache} for the next start"
