"""Weight-only int8 and int4 for CPU decoding; activations go through the kernels in bf16.

Single-stream decoding on a CPU reads every weight once per token, so it is bound by memory bandwidth: int8 weights
read a quarter of fp32's bytes, int4 an eighth (plus a bf16 scale and zero point per group). The matmuls are PyTorch's
own weight-only kernels: `_weight_int8pack_mm` (the one gpt-fast uses) and `_weight_int4pack_mm_for_cpu` (torchao's
CPU int4 layout). Both are fast only with bf16 activations: with fp32 activations they fall back to a generic loop
5-15x slower (measured on a 2-core AVX2 machine without bf16 matrix units), so the input is cast to bf16 and the output
back, whatever the model's dtype. With many rows (prefill) they are slower than an fp32 GEMM (int4: 2-3x at 512 rows;
still ~3x faster than a bf16 GEMM without bf16 units), so quantizing is an option for batch-1 use, not the default.

int4 is asymmetric per group of `group_size` input features along each output row: 16 levels evenly spaced from the
group's minimum to its maximum (w ~ (q - 8) * scale + zero, with q in 0..15, as the kernel computes it).
"""

from __future__ import annotations

import torch
from torch import nn

INT4_GROUP_SIZE = 32  # Q4_0's block; 64 and 128 read slightly fewer bytes at a higher KL (docs/models.md)
MODES = ("int8", "int4")


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("int8: linear layers with bias are not supported (Apertus has none)")
        w = linear.weight.detach().to(torch.float32, copy=True)  # a copy, worked on in place (start-up time)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", w.mul_(1 / scale[:, None]).round_().to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(flat, self.weight, self.scale)
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


def _linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute name) of every nn.Linear: not the layers themselves, so that each one's float weights are
    freed as soon as it is replaced (holding them all would need the float model and the quantized one at once:
    24 GB for the 8B in int8)."""
    return [(parent, name) for parent in list(model.modules())
            for name, child in list(parent.named_children()) if isinstance(child, nn.Linear)]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of the model (projections, MLP, lm_head) in place; embeddings and norms stay."""
    for parent, name in _linears(model):
        setattr(parent, name, Int8Linear(getattr(parent, name)))
    return model


def quantize_int4(model: nn.Module, group_size: int = INT4_GROUP_SIZE) -> nn.Module:
    """As quantize_int8, with Int4Linear. Every layer is checked before any is replaced, so a model that cannot be
    quantized is left as it was."""
    for name, child in model.named_modules():
        if isinstance(child, nn.Linear) and child.in_features % group_size:
            raise ValueError(f"int4: layer {name} has in_features {child.in_features}, not a multiple "
                             f"of the group size {group_size}; use int8 (or a group size that divides it)")
    for parent, name in _linears(model):
        setattr(parent, name, Int4Linear(getattr(parent, name), group_size))
    return model


def quantize_weights(model: nn.Module, mode: str) -> nn.Module:
    """`mode` "int8" or "int4": the model's linear layers in place, for CPU decoding."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not supported; use one of {', '.join(MODES)}")
    return quantize_int8(model) if mode == "int8" else quantize_int4(model)
