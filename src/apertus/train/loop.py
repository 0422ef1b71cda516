"""The one training loop: pretraining uses it here, SFT and QRPO bring their own batches and loss.

What a stage supplies:
- `source`: `next_step()` → the micro-batches (dicts of tensors) this rank processes for the next optimizer step,
  plus `state_dict()` / `load_state_dict()` (JSON) for exact resume;
- `loss_fn(model, batch)` → (sum of the per-item losses, number of items) — tokens for language modelling, pairs
  for preference losses. The step's loss is Σ sums / Σ counts over every micro-batch of every rank, so the result does
  not depend on how the global batch is split into micro-batches and ranks;
- `LoopConfig`: steps, learning rate as a function of (step, tokens seen), clipping, logging, validation, checkpoints.

What the loop does: bf16 autocast over fp32 master weights, gradient accumulation, global-norm clipping, progress
bar (tokens/s, ETA), one log line per step (loss, lr, grad norm, tokens/s, MFU), metrics JSONL + TensorBoard events,
periodic validation, atomic checkpoints with keep-last-k / permanent ones, resume from the newest complete one
(SIGTERM, as a scheduler sends before preemption, saves one and stops), a loss-curve PNG at the end.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..util import hms
from .checkpointing import load_checkpoint, resume_point, save_checkpoint
from .distributed import Dist, all_reduce_sum, barrier, clip_grad_norm_

GPU_BF16_PEAK = 989e12  # H100/H200/GH200 dense bf16 FLOP/s, the usual MFU reference


@dataclass
class LoopConfig:
    out_dir: str | Path
    steps: int
    lr: Callable[[int, int], float]  # (step, tokens seen before it) -> learning rate
    grad_clip: float | None = 1.0
    dtype: str = "bf16"  # autocast dtype; "fp32" trains without autocast
    flops_per_token: Callable[[int], float] | None = None  # (sequence length) -> training FLOPs per token, for MFU
    peak_flops: float | None = None  # per device; None: 989 TFLOP/s on GPUs, measured matmul peak on CPU
    log_every: int = 1
    val_every: int = 0
    ckpt_every: int = 0
    keep_last: int = 2
    permanent_every: int = 0
    name: str = "train"


@functools.cache
def matmul_peak_flops(dtype: torch.dtype = torch.bfloat16, device: str = "cpu", n: int = 1024, reps: int = 10,
                      budget_s: float = 2.0) -> float:
    """FLOP/s of the fastest of up to `reps` square matmuls: the machine's practical peak, for MFU on CPUs (the
    fastest rep, not the mean, so that other work on a shared machine does not lower the reference). Measured once
    per process, and at least 3 reps but no more than `budget_s` seconds: on a CPU without bf16 matrix units a bf16
    matmul runs ~10x slower than fp32, and the reference must not cost each run minutes."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up: first-call allocation and kernel selection
    best, start = float("inf"), time.perf_counter()
    for i in range(reps):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return 2 * n**3 / best


class _Metrics:
    """metrics.jsonl (truncated to the resumed step, so a resumed run's file reads like one that never stopped)
    and TensorBoard events (purged past the resumed step). Rank 0 only."""

    def __init__(self, out: Path, start_step: int, enabled: bool):
        self.enabled, self.file, self.tb = enabled, out / "metrics.jsonl", None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if self.file.exists():
            keep = [line for line in self.file.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.file.write_text("".join(line + "\n" for line in keep))
        self.fh = self.file.open("a")
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict):
        if not self.enabled:
            return
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self):
        if self.enabled:
            self.fh.close()
            if self.tb:
                self.tb.close()


def plot_metrics(jsonl: str | Path, png: str | Path, title: str = "") -> None:
    """Loss curve (training, and validation per language) and learning rate against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    if not train:
        return
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=0.8, label="train")
    val_keys = sorted({k for r in rows for k in r if k.startswith("val/") and k.endswith("/loss")})
    for k in val_keys:
        pts = [(r["tokens"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=k[4:-5] or "val")
    ax.set(xlabel="tokens", ylabel="loss (nats/token)", title=title or "loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax_lr.plot([r["tokens"] for r in train], [r["lr"] for r in train])
    ax_lr.set(xlabel="tokens", ylabel="learning rate", title="schedule")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def to_device(batch: dict, device) -> dict:
    """A batch's tensors on `device` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train(model, optimizer, source, loss_fn, cfg: LoopConfig, d: Dist,
          validate: Callable[[torch.nn.Module], dict] | None = None) -> dict:
    """Run (or resume) the loop until cfg.steps; returns the last step's metrics (with the final validation)."""
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    step, tokens = 0, 0
    found = resume_point(ckpt_root)
    if found is not None:
        state, rank_state = load_checkpoint(found, model, optimizer, d)
        source.load_state_dict(rank_state["source"])
        step, tokens = state["step"], state["tokens"]
        if d.main:
            tqdm.write(f"{cfg.name}: resuming from {found} (step {step}, {tokens:,} tokens)")
    metrics = _Metrics(out, step, d.main)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    peak = cfg.peak_flops or (GPU_BF16_PEAK if d.device.type == "cuda" else matmul_peak_flops(
        torch.bfloat16 if cfg.dtype == "bf16" else torch.float32))
    params = [p for p in model.parameters() if p.requires_grad]
    stop = {"flag": 0.0}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=1.0)) if _main_thread() else None

    def checkpoint():
        save_checkpoint(ckpt_root, step, model, optimizer, d, {"tokens": tokens, "name": cfg.name},
                        {"source": source.state_dict()}, cfg.keep_last, cfg.permanent_every)

    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.name, unit="step", disable=not d.main, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file gets a bar line every 30 s
    record, t_start, start_step = {}, time.perf_counter(), step
    model.train()
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = cfg.lr(step, tokens)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = _accumulate(model, source, loss_fn, cfg, d, autocast, stop)
        count = max(stats[1], 1.0)
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, d.world_size / count)  # FSDP averaged over ranks; make it Σ / count
        grad_norm = clip_grad_norm_(params, cfg.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += int(stats[2])
        dt = time.perf_counter() - t0
        loss = stats[0] / count
        record = {"step": step, "tokens": tokens, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": stats[2] / dt, "mfu": stats[3] / dt / (peak * d.world_size),
                  "time": time.time()}
        if not math.isfinite(loss):
            raise FloatingPointError(f"{cfg.name}: loss is {loss} at step {step}; resume from the last checkpoint "
                                     "with a lower learning rate or check the data")
        if validate and ((cfg.val_every and step % cfg.val_every == 0) or step == cfg.steps):
            record.update(_validate(model, validate, autocast))
        metrics.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
        if d.main and (step % cfg.log_every == 0 or step == cfg.steps):
            eta = (time.perf_counter() - t_start) / (step - start_step) * (cfg.steps - step)
            tqdm.write(_log_line(cfg, record, eta))
        if step == cfg.steps or stats[4] > 0 or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
            checkpoint()
        if stats[4] > 0:
            if d.main:
                tqdm.write(f"{cfg.name}: stopped by SIGTERM at step {step}; checkpoint saved, rerun to resume")
            break
    bar.close()
    metrics.close()
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
    if d.main and metrics.file.exists():
        plot_metrics(metrics.file, out / "loss.png", cfg.name)
    barrier()
    return {**record, "step": step, "tokens": tokens}


def _accumulate(model, source, loss_fn, cfg: LoopConfig, d: Dist, autocast, stop: dict) -> list[float]:
    """Forward and backward over this rank's micro-batches of the step; returns [loss sum, counted items, tokens,
    FLOPs, stop request], each summed over micro-batches and ranks."""
    stats = torch.zeros(5, dtype=torch.float64, device=d.device)
    for batch in source.next_step():
        batch = to_device(batch, d.device)
        with autocast:
            loss_sum, count = loss_fn(model, batch)
        loss_sum.backward()
        n_tok = batch["input_ids"].numel()
        stats[0] += loss_sum.detach()
        stats[1] += count
        stats[2] += n_tok
        if cfg.flops_per_token:
            stats[3] += cfg.flops_per_token(batch["input_ids"].shape[-1]) * n_tok
    stats[4] = stop["flag"]  # read after the micro-batches: a SIGTERM during them stops this step
    return all_reduce_sum(stats).tolist()


def _log_line(cfg: LoopConfig, r: dict, eta: float) -> str:
    val = "".join(f" | {k[4:]} {v:.4f}" for k, v in r.items() if k.startswith("val/"))
    return (f"{cfg.name} step {r['step']}/{cfg.steps} | loss {r['loss']:.4f} | lr {r['lr']:.3e} | grad "
            f"{r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s | MFU {100 * r['mfu']:.1f}% | ETA {hms(eta)}{val}")


def _validate(model, validate, autocast) -> dict:
    model.eval()
    with torch.no_grad(), autocast:
        result = {f"val/{k}": float(v) for k, v in validate(model).items()}
    model.train()
    return result


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()

