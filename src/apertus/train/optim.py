"""AdEMAMix (Pagliardini, Ablin, Grangier 2024) and the WSD learning-rate schedule, as Apertus ran them (SPEC §2).

AdEMAMix keeps a fast EMA m1 (bias-corrected), a slow EMA m2 (not bias-corrected) and the second moment nu:

    update = (m1 / (1 - β1^t) + α(t)·m2) / (sqrt(nu) / sqrt(1 - β2^t) + eps)
    θ ← θ − lr·(update + λ·θ)

α(t) warms up linearly from 0 over t_alpha steps, β3(t) linearly in half-life space from β1 over t_beta3 steps.
The step counter lives in the parameter group (as in Megatron), so a group's tensors are updated with one foreach
call each; the state tensors have the parameters' layout, so sharded DTensor parameters (FSDP2) just work.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def alpha_at(t: int, alpha: float, t_alpha: int | None) -> float:
    """α(t): linear from 0 to α over t_alpha steps (None: no warmup)."""
    return alpha * t / t_alpha if t_alpha and t < t_alpha else alpha


def beta3_at(t: int, beta1: float, beta3: float, t_beta3: int | None) -> float:
    """β3(t): linear interpolation of the half-life from that of β1 to that of β3 over t_beta3 steps."""
    if not t_beta3 or t >= t_beta3:
        return beta3

    def half_life(b):
        return math.log(0.5) / math.log(b + 1e-8) - 1

    a = t / t_beta3
    return 0.5 ** (1 / ((1 - a) * half_life(beta1) + a * half_life(beta3) + 1))


class AdEMAMix(torch.optim.Optimizer):
    def __init__(self, params, lr, betas=(0.9, 0.999, 0.9999), alpha=8.0, t_alpha=None, t_beta3=None, eps=1e-8,
                 weight_decay=0.0, compile=False):
        for name, value, ok in (("lr", lr, lr >= 0), ("eps", eps, eps >= 0), ("alpha", alpha, alpha >= 0),
                                ("weight_decay", weight_decay, weight_decay >= 0),
                                ("betas", betas, len(betas) == 3 and all(0 <= b < 1 for b in betas)),
                                ("t_alpha", t_alpha, t_alpha is None or t_alpha > 0),
                                ("t_beta3", t_beta3, t_beta3 is None or t_beta3 > 0)):
            if not ok:
                raise ValueError(f"AdEMAMix: invalid {name} {value!r}")
        defaults = dict(lr=lr, betas=tuple(betas), alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, eps=eps,
                        weight_decay=weight_decay, step=0)
        super().__init__(params, defaults)
        self.compile = compile  # a way of running the update, not state: not in the groups, not in the checkpoint

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        update = _update_compiled if self.compile else _update
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            group["step"] += 1
            t = group["step"]
            beta1, beta2, beta3_final = group["betas"]
            for p in params:
                state = self.state[p]
                if not state:
                    if beta1 > 0:
                        state["exp_avg_fast"] = torch.zeros_like(p)
                    state["exp_avg_slow"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
            update(params, [p.grad for p in params],
                   [self.state[p]["exp_avg_fast"] for p in params] if beta1 > 0 else None,
                   [self.state[p]["exp_avg_slow"] for p in params], [self.state[p]["exp_avg_sq"] for p in params],
                   lr=group["lr"], wd=group["weight_decay"], eps=group["eps"], beta1=beta1, beta2=beta2,
                   beta3=beta3_at(t, beta1, beta3_final, group["t_beta3"]),
                   alpha=alpha_at(t, group["alpha"], group["t_alpha"]),
                   correction1=1 - beta1**t, correction2=math.sqrt(1 - beta2**t))
        return loss


def _update(params, grads, fast, slow, sq, *, lr, wd, eps, beta1, beta2, beta3, alpha, correction1, correction2):
    """One AdEMAMix update of a group's tensors, in place (foreach: one call per operation for all the tensors)."""
    torch._foreach_mul_(slow, beta3)
    torch._foreach_add_(slow, grads, alpha=1 - beta3)
    torch._foreach_mul_(sq, beta2)
    torch._foreach_addcmul_(sq, grads, grads, value=1 - beta2)
    if fast is not None:
        torch._foreach_mul_(fast, beta1)
        torch._foreach_add_(fast, grads, alpha=1 - beta1)
    else:  # β1 = 0: the "fast EMA" is the gradient itself (no state kept)
        fast = grads
    # numerator = m1/(1-β1^t) + α·m2 ; denominator = sqrt(nu)/sqrt(1-β2^t) + eps
    num = torch._foreach_mul(slow, alpha)
    torch._foreach_add_(num, fast, alpha=1 / correction1)
    denom = torch._foreach_sqrt(sq)
    torch._foreach_div_(denom, correction2)
    torch._foreach_add_(denom, eps)
    if wd:  # θ − lr·λ·θ, decoupled from the adaptive update (AdamW style)
        torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_addcdiv_(params, num, denom, value=-lr)


def _update_one(p, g, fast, slow, sq, s):
    """The same update of one tensor, written for inductor to fuse into one pass over the parameter and its state
    (the optimizer step is memory-bound; the foreach calls above make thirteen passes). `s` holds the step's scalars,
    as one tensor so that a new step's α(t), β3(t) and bias corrections do not recompile it."""
    beta3, one_minus_beta3, beta2, one_minus_beta2, beta1, one_minus_beta1, alpha, inv_c1, c2, eps, decay, lr = (
        s.unbind())
    slow.copy_(slow * beta3 + g * one_minus_beta3)
    sq.copy_(sq * beta2 + g * g * one_minus_beta2)
    if fast is None:
        fast = g
    else:
        fast.copy_(fast * beta1 + g * one_minus_beta1)
    num = slow * alpha + fast * inv_c1
    p.copy_(p * decay - lr * (num / (sq.sqrt() / c2 + eps)))


_update_one_compiled = torch.compile(_update_one, dynamic=True)


def _update_compiled(params, grads, fast, slow, sq, *, lr, wd, eps, beta1, beta2, beta3, alpha, correction1,
                     correction2):
    """`_update` through the compiled one-tensor kernel, on flat views of each tensor (one graph for every shape) and
    of each DTensor's local shard (the update is elementwise, so FSDP2's shards update independently)."""
    s = torch.tensor([beta3, 1 - beta3, beta2, 1 - beta2, beta1, 1 - beta1, alpha, 1 / correction1, correction2, eps,
                      1 - lr * wd, lr], dtype=torch.promote_types(params[0].dtype, torch.float32),
                     device=params[0].device)
    flat = [[_local(t).view(-1) for t in ts] for ts in (params, slow, sq)]  # views: updated in place
    for i, (p, m2, nu) in enumerate(zip(*flat, strict=True)):
        m1 = None if fast is None else _local(fast[i]).view(-1)
        _update_one_compiled(p, _local(grads[i]).reshape(-1), m1, m2, nu, s)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


# --- parameter groups and the optimizer of a recipe -----------------------------------------------------------------


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """1-D parameters (norm weights, biases) and the xIELU scalars are not decayed (Megatron's rule, SPEC §2.2)."""
    return p.ndim < 2 or name.endswith(("alpha_p", "alpha_n"))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str = "ademamix", lr: float = 1e-3, betas=(0.9, 0.999, 0.9999),
                    alpha: float = 8.0, t_alpha: int | None = None, t_beta3: int | None = None, eps: float = 1e-8,
                    weight_decay: float = 0.0, compile: bool = False) -> torch.optim.Optimizer:
    """AdEMAMix, or torch's AdamW as the baseline (it uses the first two betas). `compile`: AdEMAMix's update through
    inductor, AdamW's fused kernel; else both run as foreach calls."""
    groups = param_groups(model, weight_decay)
    if name == "ademamix":
        return AdEMAMix(groups, lr=lr, betas=tuple(betas), alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, eps=eps,
                        compile=compile)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas[:2]), eps=eps, foreach=not compile, fused=compile)
    raise ValueError(f"optimizer name {name!r}: use 'ademamix' or 'adamw'")


# --- WSD schedule -----------------------------------------------------------------------------------------------------

DECAYS = ("1-sqrt", "linear", "cosine")


def wsd(t: float, *, peak: float, total: float, warmup: float = 0, cooldown: float = 0, min_lr: float = 0.0,
        warmup_init: float = 0.0, decay: str = "1-sqrt") -> float:
    """Warmup-stable-decay learning rate at position t (steps, samples or tokens: one unit for all arguments).

    Megatron's form (SPEC §2.2): linear warmup from warmup_init·peak (t ≤ warmup), peak until total − cooldown, then
    lr = min_lr + coeff·(peak − min_lr) with r = fraction of the cooldown done and coeff = 1 − sqrt(r), 1 − r or
    (1 + cos πr)/2; min_lr after total.
    """
    if decay not in DECAYS:
        raise ValueError(f"schedule decay {decay!r}: use one of {', '.join(DECAYS)}")
    if warmup > 0 and t <= warmup:
        init = warmup_init * peak
        return init + (peak - init) * t / warmup
    if t > total:
        return min_lr
    start = total - cooldown
    if t <= start:
        return peak
    r = (t - start) / cooldown
    coeff = {"1-sqrt": 1 - math.sqrt(r), "linear": 1 - r, "cosine": 0.5 * (1 + math.cos(math.pi * r))}[decay]
    return min_lr + coeff * (peak - min_lr)
