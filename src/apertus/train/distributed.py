"""Parallelism, applied from outside the model by one function (`parallelize`), and the process-group plumbing.

Under `torchrun` (WORLD_SIZE > 1) the model is sharded with FSDP2: `fully_shard` on every block, then on the root
(embeddings, final norm, lm_head). A single process runs the very same training code with the model unsharded and
the collectives below reduced to no-ops, so CPU tests exercise the path the cluster runs.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> Dist:
    """Join the process group torchrun describes in the environment (NCCL on GPUs, gloo on CPU); else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local}") if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local, dev)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def run_job(fn, *args) -> int:
    """The tail of every training command: run `fn(*args)` (a result dict), always leave the process group, and
    print the result as one JSON line on rank 0 (its "time" entry left out)."""
    try:
        result = fn(*args)
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "time"}))
    return 0


def launch(module: str, argv: list[str], nproc: int) -> int:
    """Run `python -m module *argv` again as `nproc` processes under torchrun (gloo on CPU, NCCL on GPUs), the one
    launcher of the training commands: the children parse the same arguments and, seeing WORLD_SIZE, train. The
    command's own --nproc is left out (torchrun's parser would take it for an abbreviation of --nproc-per-node)."""
    import subprocess
    import sys

    rest, skip = [], False
    for a in argv:
        if skip or a.startswith("--nproc="):
            skip = False
        elif a == "--nproc":
            skip = True
        else:
            rest.append(a)
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={nproc}", "-m", module, *rest])


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place; returns t). Identity in a single process."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(x: float) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def broadcast_object(obj):
    """Rank 0's value of a small picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _wrap_forward(block: nn.Module, checkpointing: bool, compile: bool):
    """Replace the block's forward (the module and its parameter names stay as they are)."""
    fwd = block.forward
    if checkpointing:  # keep only the block's input; recompute the rest in backward
        fwd = functools.partial(torch.utils.checkpoint.checkpoint, fwd, use_reentrant=False)
    if compile:  # the forward only: FSDP's hooks around it stay eager
        fwd = torch.compile(fwd)
    block.forward = fwd


def parallelize(model: nn.Module, d: Dist, *, activation_checkpointing: bool = False, compile: bool = False,
                param_dtype: torch.dtype | None = None) -> nn.Module:
    """Activation checkpointing and torch.compile per block, then FSDP2 when there is more than one rank.

    `param_dtype` (e.g. bf16) makes FSDP all-gather parameters in that dtype (MixedPrecisionPolicy) while the
    sharded master weights, gradient reduction and optimizer state stay fp32; None gathers them as they are.
    """
    for block in model.model.layers:
        _wrap_forward(block, activation_checkpointing, compile)
    if d.sharded:
        shard(model, param_dtype)
    return model


def shard(model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 over the default process group: `fully_shard` on every block, then on the root. Called by `parallelize`
    when there is more than one rank; bench/gpu.py calls it at world size 1 to time the sharded code path."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    # The root keeps embeddings, final norm and lm_head gathered between forward and backward: the training loss
    # reads lm_head.weight right after `hidden_states` (chunked cross-entropy), outside any module's forward.
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    register_fsdp_forward_method(model, "hidden_states")
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model weights on CPU (every rank takes part; all ranks receive them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Global gradient norm over all ranks' shards; gradients are scaled down to max_norm when it is exceeded."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # DTensor (FSDP2): the norm of the whole gradient
        norm = norm.full_tensor()
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
