"""Weight-only int8 for CPU decoding: per-output-channel symmetric int8 weights, bf16 activations.

Single-stream decoding on a CPU reads every weight once per token, so it is bound by memory bandwidth; int8 weights
read a quarter of fp32's bytes (bench/engine.py measures it against fp32 and transformers). The matmul is PyTorch's
own int8-weight kernel (`_weight_int8pack_mm`, the one gpt-fast uses); with many rows it is slower than bf16 GEMM,
so this is an option for batch-1 use, not the default.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("int8: linear layers with bias are not supported (Apertus has none)")
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(flat, self.weight, self.scale)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of the model (projections, MLP, lm_head) in place; embeddings and norms stay."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model
