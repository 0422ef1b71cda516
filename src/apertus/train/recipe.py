"""Pretraining recipes: TOML tables → checked dataclasses, stage arithmetic, and the `--dry-run` plan.

    [model]       preset + overrides (apertus.config.model_config_from), optional init_from = HF checkpoint dir
    [data]        dataset = built dataset dir (PackedLoader), tokenizer = tokenizer.json (bits per byte, export)
    [train]       seq_len, global_batch_tokens, micro_batch, steps or tokens, dtype, grad_clip, Goldfish k/h, ...
    [optim]       AdEMAMix or AdamW hyperparameters
    [schedule]    WSD over tokens: warmup_tokens, warmup_init, cooldown_tokens, decay, min_lr
    [checkpoint]  every, keep_last, permanent_every
    [eval]        every, batches, languages, prompts, sample_tokens
    [[stages]]    curriculum and long-context stages, in order (none: one stage of [train]'s length)

A stage lasts `steps` optimizer steps (or `tokens`); it names its data stage and data seed, and may change the
sequence length, global batch, micro-batch, RoPE θ, document masking, and the learning rate (a stage with `lr` warms
up over `warmup_steps` to that constant LR instead of following the WSD schedule, as the long-context stages do).
The data stream restarts (new stage, new seed) only where the data stage, seed or sequence length changes, so a
stage that only changes the batch size continues the same stream.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..checkpoint import resolve_checkpoint_dir
from ..config import ApertusConfig, load_config, load_toml, model_config_from
from .loop import LoopConfig
from .optim import DECAYS, build_optimizer, wsd


@dataclass
class PretrainData:
    dataset: str | None = None
    tokenizer: str | None = None


# The family of tables every training command shares: one meaning per field, defaults per command.


@dataclass
class Train:
    """[train] fields every training command has."""
    seq_len: int = 4096  # longest row (pretraining: the sequence; SFT: conversation or pack; alignment: prompt + reply)
    micro_batch: int = 1  # rows per forward pass and rank
    steps: int = 0  # optimizer steps; 0: derived (pretraining: from tokens; post-training: from epochs)
    seed: int = 0
    dtype: str = "bf16"  # autocast; "auto": bf16 where the hardware multiplies bf16 fast, else fp32
    grad_clip: float = 1.0  # global norm; 0: no clipping
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp_param_dtype: str = "fp32"  # "bf16": all-gather bf16 copies (fp32 masters, fp32 reduction)
    log_every: int = 1
    peak_flops: float = 0.0  # per device, for MFU; 0: 989 TFLOP/s on GPUs, measured on CPU


@dataclass
class PretrainTrain(Train):
    global_batch_tokens: int = 4096 * 1024
    tokens: int = 0  # length when there are no [[stages]] (or steps)
    grad_clip: float = 0.1
    goldfish_k: int = 50  # 0 turns Goldfish off
    goldfish_h: int = 50


@dataclass
class Optim:
    """[optim] of every training command (pretraining's LR schedule is [schedule]; post-training's warmup_ratio)."""
    name: str = "ademamix"
    lr: float = 1.1e-4
    min_lr: float = 1.1e-5
    betas: list = field(default_factory=lambda: [0.9, 0.999, 0.9999])
    alpha: float = 8.0
    t_alpha: int = 0  # steps of the α warmup; 0: the whole run (as Apertus did in pretraining and SFT)
    t_beta3: int = 0  # steps of the β3 warmup; 0: the whole run
    eps: float = 1e-8
    weight_decay: float = 0.1


def make_optimizer(model, o: Optim, steps: int, compile: bool = False):
    """The recipe's optimizer for a run of `steps` optimizer steps (the α and β3 warmups default to all of them);
    `compile` ([train] compile) fuses its update."""
    return build_optimizer(model, o.name, lr=o.lr, betas=o.betas, alpha=o.alpha, t_alpha=o.t_alpha or steps,
                           t_beta3=o.t_beta3 or steps, eps=o.eps, weight_decay=o.weight_decay, compile=compile)


def loop_config(name: str, out, steps: int, lr, t: Train, ck: Checkpoint, flops_per_token,
                val_every: int = 0) -> LoopConfig:
    """The shared loop's settings from a recipe's [train] and [checkpoint] tables."""
    return LoopConfig(out_dir=out, steps=steps, lr=lr, grad_clip=t.grad_clip or None, dtype=t.dtype,
                      flops_per_token=flops_per_token, peak_flops=t.peak_flops or None, log_every=t.log_every,
                      val_every=val_every, ckpt_every=ck.every, keep_last=ck.keep_last,
                      permanent_every=ck.permanent_every, name=name)


@dataclass
class Schedule:
    warmup_tokens: int = 0
    warmup_init: float = 0.0  # fraction of the peak LR the warmup starts from
    cooldown_tokens: int = 0
    decay: str = "1-sqrt"


@dataclass
class Checkpoint:
    every: int = 0
    keep_last: int = 2
    permanent_every: int = 0


@dataclass
class Eval:
    every: int = 0
    batches: int = 4  # micro-batches per rank and language
    languages: list = field(default_factory=list)  # held-out languages (codes of the dataset); []: the 4 largest
    prompts: list = field(default_factory=list)  # continued at every evaluation, into samples.jsonl (pretraining)
    sample_tokens: int = 32


@dataclass
class Stage:
    name: str = ""
    steps: int = 0
    tokens: int = 0
    data: str | None = None  # data stage of the built dataset; None: all of it
    seed: int | None = None  # data seed; None: [train] seed
    seq_len: int | None = None
    global_batch_tokens: int | None = None
    micro_batch: int | None = None
    rope_theta: float | None = None
    document_masking: bool = True
    lr: float | None = None
    warmup_steps: int = 0
    # derived
    start_tokens: int = 0
    start_step: int = 0


@dataclass
class Recipe:
    model: ApertusConfig
    init_from: str | None
    data: PretrainData
    train: PretrainTrain
    optim: Optim
    schedule: Schedule
    checkpoint: Checkpoint
    eval: Eval
    stages: list[Stage]

    @property
    def steps(self) -> int:
        return self.stages[-1].start_step + self.stages[-1].steps

    @property
    def tokens(self) -> int:
        return sum(s.steps * s.global_batch_tokens for s in self.stages)

    @property
    def schedule_tokens(self) -> int:
        """Tokens of the stages that follow the WSD schedule (its 'total')."""
        return sum(s.steps * s.global_batch_tokens for s in self.stages if s.lr is None)

    def stage_at(self, step: int) -> int:
        for i in range(len(self.stages) - 1, -1, -1):
            if step >= self.stages[i].start_step:
                return i
        return 0

    def lr_at(self, step: int, tokens: int) -> float:
        st = self.stages[self.stage_at(step)]
        if st.lr is not None:  # long-context stage: warmup to a constant LR
            k = step - st.start_step
            return st.lr * min(1.0, k / st.warmup_steps) if st.warmup_steps else st.lr
        o, s = self.optim, self.schedule
        return wsd(tokens, peak=o.lr, total=self.schedule_tokens, warmup=s.warmup_tokens, cooldown=s.cooldown_tokens,
                   min_lr=o.min_lr, warmup_init=s.warmup_init, decay=s.decay)


def parse_table(cls, d: Any, where: str):
    """A recipe table as the dataclass `cls`, each value checked against the field's type; errors name the key."""
    if d is None:
        return cls()
    if not isinstance(d, dict):
        raise ValueError(f"recipe: [{where}] must be a table")
    known = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("start_tokens", "start_step")}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"recipe: [{where}] unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})")
    out = {}
    for k, v in d.items():
        kind = known[k].type  # the annotation, as a string
        if kind.startswith("bool"):
            if not isinstance(v, bool):
                raise ValueError(f"recipe: [{where}] {k} must be true or false, got {v!r}")
        elif kind.startswith(("int", "float")):
            if v is None and "None" in kind:
                pass
            elif isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"recipe: [{where}] {k} must be a number, got {v!r}")
            elif kind.startswith("int"):
                if v != int(v):
                    raise ValueError(f"recipe: [{where}] {k} must be a whole number, got {v!r}")
                v = int(v)
            else:
                v = float(v)
        elif kind.startswith("str") and not (isinstance(v, str) or (v is None and "None" in kind)):
            raise ValueError(f"recipe: [{where}] {k} must be a string, got {v!r}")
        elif kind == "list" and not isinstance(v, list):
            raise ValueError(f"recipe: [{where}] {k} must be a list, got {v!r}")
        out[k] = v
    return cls(**out)


def parse_model(table: dict | None) -> tuple[ApertusConfig, str | None]:
    """`[model]`: init_from = a Hugging Face checkpoint (other keys override its config), or a preset + overrides."""
    table = dict(table or {"preset": "tiny"})
    init_from = table.pop("init_from", None)
    if not init_from:
        return model_config_from(table), None
    if "preset" in table:
        raise ValueError("recipe: [model] give preset or init_from, not both")
    init_from = str(resolve_checkpoint_dir(init_from))  # a hub id: its local snapshot (config, weights, tokenizer)
    unknown = sorted(set(table) - {f.name for f in dataclasses.fields(ApertusConfig)})
    if unknown:
        raise ValueError(f"recipe: [model] unknown key(s) {', '.join(unknown)}")
    return dataclasses.replace(load_config(init_from), **table), init_from


def parse_tables(d: dict, tables: dict[str, type]) -> dict:
    """The named tables of a recipe (plus [model]); an unknown section is an error."""
    unknown = sorted(set(d) - set(tables) - {"model"})
    if unknown:
        raise ValueError(f"recipe: unknown section(s) {', '.join(unknown)} (known: model, {', '.join(tables)})")
    return {name: parse_table(cls, d.get(name), name) for name, cls in tables.items()}


def check_optim(o: Optim):
    ensure(o.name in ("ademamix", "adamw"), f"[optim] name {o.name!r} must be 'ademamix' or 'adamw'")
    ensure(len(o.betas) == 3 or (o.name == "adamw" and len(o.betas) == 2),
           "[optim] betas must have three values for AdEMAMix (two for AdamW)")
    ensure(all(0 <= b < 1 for b in o.betas), f"[optim] betas {o.betas} must lie in [0, 1)")
    ensure(o.lr > 0 and 0 <= o.min_lr <= o.lr, f"[optim] need lr > 0 and 0 <= min_lr <= lr (lr {o.lr}, "
           f"min_lr {o.min_lr})")
    ensure(o.t_alpha >= 0 and o.t_beta3 >= 0, "[optim] t_alpha and t_beta3 must be >= 0 (0: the whole run)")


def fast_dtype() -> str:
    """"bf16" where bf16 matrix products are fast (a GPU, a CPU with AVX512-BF16 or AMX), else "fp32": on a CPU
    without those units a bf16 product runs ~10x slower than an fp32 one."""
    import torch

    return "bf16" if torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def check_train(t: Train):
    """Check [train]; `dtype = "auto"` becomes what this machine runs fastest."""
    ensure(t.dtype in ("bf16", "fp32", "auto"), f"[train] dtype {t.dtype!r} must be 'bf16', 'fp32' or 'auto'")
    if t.dtype == "auto":
        t.dtype = fast_dtype()
    ensure(t.fsdp_param_dtype in ("bf16", "fp32"), f"[train] fsdp_param_dtype {t.fsdp_param_dtype!r} must be "
           "'bf16' or 'fp32'")
    ensure(t.grad_clip >= 0, "[train] grad_clip must be >= 0 (0: no clipping)")


def parse_recipe(d: dict, world_size: int = 1) -> Recipe:
    """Check a recipe table; every error names the offending key. `world_size` is the number of ranks."""
    sections = {"model", "data", "train", "optim", "schedule", "checkpoint", "eval", "stages"}
    unknown = sorted(set(d) - sections)
    if unknown:
        raise ValueError(f"recipe: unknown section(s) {', '.join(unknown)} (known: {', '.join(sorted(sections))})")
    model, init_from = parse_model(d.get("model"))
    r = Recipe(model=model, init_from=init_from, stages=[], **parse_tables(
        {k: v for k, v in d.items() if k != "stages"},
        {"data": PretrainData, "train": PretrainTrain, "optim": Optim, "schedule": Schedule, "checkpoint": Checkpoint,
         "eval": Eval}))
    t = r.train
    raw = d.get("stages") or [{"name": "main", "steps": t.steps, "tokens": t.tokens}]
    if not isinstance(raw, list):
        raise ValueError("recipe: stages must be an array of tables ([[stages]])")
    start_step = start_tokens = 0
    for i, table in enumerate(raw):
        s = parse_table(Stage, table, f"stages.{i}")
        s.name = s.name or f"stage{i + 1}"
        for key in ("seq_len", "global_batch_tokens", "micro_batch"):
            if getattr(s, key) is None:
                setattr(s, key, getattr(t, key))
        if s.seed is None:
            s.seed = t.seed
        where = f"stages.{i} ({s.name})"
        ensure(s.seq_len > 0 and s.micro_batch > 0 and s.global_batch_tokens > 0, f"[{where}] seq_len, micro_batch "
               "and global_batch_tokens must be positive")
        ensure(s.seq_len <= model.max_position_embeddings, f"[{where}] seq_len {s.seq_len} exceeds the model's "
               f"max_position_embeddings {model.max_position_embeddings}")
        per_step = s.seq_len * s.micro_batch * world_size
        ensure(s.global_batch_tokens % per_step == 0, f"[{where}] global_batch_tokens {s.global_batch_tokens:,} is not "
               f"divisible by seq_len x micro_batch x ranks = {s.seq_len} x {s.micro_batch} x {world_size}")
        if s.steps and s.tokens:
            raise ValueError(f"recipe: [{where}] give steps or tokens, not both")
        s.steps = s.steps or math.ceil(s.tokens / s.global_batch_tokens)
        s.tokens = s.steps * s.global_batch_tokens
        ensure(s.steps > 0, f"[{where}] needs steps or tokens > 0 (or [train] steps/tokens when there are no stages)")
        ensure(s.lr is None or s.lr >= 0, f"[{where}] lr must be >= 0")
        s.start_step, s.start_tokens = start_step, start_tokens
        start_step += s.steps
        start_tokens += s.tokens
        r.stages.append(s)
    check_optim(r.optim)
    ensure(r.schedule.decay in DECAYS, f"[schedule] decay {r.schedule.decay!r} must be one of {', '.join(DECAYS)}")
    ensure(r.schedule.warmup_tokens + r.schedule.cooldown_tokens <= max(r.schedule_tokens, 1),
           "[schedule] warmup_tokens + cooldown_tokens exceed the tokens of the scheduled stages "
           f"({r.schedule_tokens:,})")
    check_train(t)
    ensure(t.goldfish_k >= 0 and t.goldfish_h >= 1, "[train] goldfish_k must be >= 0 (0 = off), goldfish_h >= 1")
    ensure(r.checkpoint.keep_last >= 1, "[checkpoint] keep_last must be >= 1")
    return r


def ensure(ok: bool, message: str):
    """A ValueError naming the recipe problem unless `ok`."""
    if not ok:
        raise ValueError(f"recipe: {message}")


def load_recipe(path, world_size: int = 1, overrides: list[str] = ()) -> Recipe:
    """Read a TOML recipe; `overrides` are `section.key=value` strings (TOML values) applied first."""
    d = load_toml(path)
    for item in overrides:
        apply_override(d, item)
    return parse_recipe(d, world_size)


def apply_override(d: dict, item: str):
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ValueError(f"override {item!r}: expected section.key=value (e.g. train.steps=100)")
    key, value = item.split("=", 1)
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare string, e.g. a path
    *path, last = key.strip().split(".")
    node = d
    for p in path:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    node[last] = parsed


# --- the plan (--dry-run) --------------------------------------------------------------------------------------------


def activation_bytes(cfg: ApertusConfig, tokens: int, checkpointing: bool) -> float:
    """Rough bf16-autocast activation memory of one micro-batch (±30%): per token and layer ≈ 58·d + 24·kv + 12·ffn
    bytes saved for backward (fp32 residual stream and norms, bf16 matmul inputs, xIELU intermediates); with
    checkpointing only each block's fp32 input is kept, plus one block's worth during its recomputation."""
    d, kv, f, L = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size, cfg.num_hidden_layers
    per_layer = (58 * d + 24 * kv + 12 * f) * tokens
    return (L * 4 * d * tokens + per_layer) if checkpointing else L * per_layer


def memory_per_gpu(r: Recipe, gpus: int, stage: Stage) -> dict[str, float]:
    """Bytes per GPU under FSDP over `gpus` ranks: sharded fp32 weights, gradients and optimizer state, the
    gathered blocks, activations of one micro-batch, and the logits chunk of the loss."""
    from .loss import default_chunk_rows

    cfg = r.model
    n = cfg.num_params()
    opt_bytes = 12 if r.optim.name == "ademamix" else 8
    pbytes = 2 if r.train.fsdp_param_dtype == "bf16" else 4
    embed = 2 * cfg.vocab_size * cfg.hidden_size
    block = (n - embed) / cfg.num_hidden_layers
    gathered = 2 * block * pbytes + block * 4 if gpus > 1 else 0  # current + prefetched block, unsharded grads
    root = embed * (pbytes + 4) if gpus > 1 else 0  # the root (embeddings, lm_head) stays gathered in a step
    chunk = default_chunk_rows(cfg.vocab_size)
    return {"weights+grads+optimizer (sharded)": n * (8 + opt_bytes) / gpus, "gathered parameters": gathered + root,
            "activations": activation_bytes(cfg, stage.micro_batch * stage.seq_len, r.train.activation_checkpointing),
            "loss chunk": 2 * 4 * chunk * cfg.vocab_size}


def plan(r: Recipe, gpus: int = 1, gpu_memory_gb: float = 80.0, mfu: float = 0.35,
         peak_flops: float = 989e12) -> str:
    """Steps, tokens, FLOPs, memory per GPU and time of a recipe on `gpus` devices, as text."""
    cfg = r.model
    lines = [f"model: {cfg.num_params() / 1e9:.2f}B parameters, {cfg.num_hidden_layers} layers, hidden "
             f"{cfg.hidden_size}, vocab {cfg.vocab_size:,}; init from {r.init_from or 'scratch'}",
             f"optimizer: {r.optim.name} lr {r.optim.lr:g} -> {r.optim.min_lr:g}, betas {r.optim.betas}, "
             f"alpha {r.optim.alpha:g}, t_alpha {r.optim.t_alpha:,}, t_beta3 {r.optim.t_beta3:,}, "
             f"wd {r.optim.weight_decay:g}, clip {r.train.grad_clip:g}, Goldfish k={r.train.goldfish_k} "
             f"h={r.train.goldfish_h}",
             f"schedule: WSD over {r.schedule_tokens:,} tokens, warmup {r.schedule.warmup_tokens:,} tokens from "
             f"{r.schedule.warmup_init:g}x peak, {r.schedule.decay} cooldown over the last "
             f"{r.schedule.cooldown_tokens:,} tokens",
             f"{'stage':>10} {'data':>10} {'first step':>11} {'steps':>10} {'start tokens':>18} {'tokens':>18} "
             f"{'seq':>6} {'batch (seqs)':>12} {'accum':>6} {'theta':>11} {'lr':>14} {'FLOPs':>9} {'GiB/GPU':>8}"]
    total_flops, worst = 0.0, 0.0
    for s in r.stages:
        flops = s.tokens * cfg.flops_per_token(s.seq_len)
        total_flops += flops
        mem = sum(memory_per_gpu(r, gpus, s).values())
        worst = max(worst, mem)
        accum = s.global_batch_tokens // (s.seq_len * s.micro_batch * gpus) if s.global_batch_tokens % (
            s.seq_len * s.micro_batch * gpus) == 0 else float("nan")
        lr = "WSD" if s.lr is None else f"{s.lr:g} (wu {s.warmup_steps})"
        theta = s.rope_theta or cfg.rope_theta
        lines.append(f"{s.name:>10} {str(s.data or '-'):>10} {s.start_step + 1:>11,} {s.steps:>10,} "
                     f"{s.start_tokens:>18,} {s.tokens:>18,} {s.seq_len:>6} "
                     f"{s.global_batch_tokens // s.seq_len:>12,} {accum:>6} {theta:>11,.0f} {lr:>14} "
                     f"{flops:>9.2e} {mem / 2**30:>8.1f}")
    days = total_flops / (gpus * peak_flops * mfu) / 86400
    fits = "fits" if worst <= gpu_memory_gb * 2**30 else "does NOT fit"
    lines += [f"total: {r.steps:,} steps, {r.tokens:,} tokens ({r.tokens / 1e12:.3f}T), {total_flops:.3e} FLOPs",
              f"on {gpus:,} GPUs: peak memory ~{worst / 2**30:.1f} GiB per GPU ({fits} in {gpu_memory_gb:g} GiB; "
              f"activation checkpointing {'on' if r.train.activation_checkpointing else 'off'}); "
              f"~{days:,.1f} days at {100 * mfu:.0f}% MFU of {peak_flops / 1e12:.0f} TFLOP/s"]
    mem = memory_per_gpu(r, gpus, max(r.stages, key=lambda s: s.seq_len * s.micro_batch))
    lines.append("memory breakdown (longest micro-batch): " + ", ".join(
        f"{k} {v / 2**30:.1f} GiB" for k, v in mem.items()))
    return "\n".join(lines)


# --- `apertus info`: sizes, FLOPs and memory of one model ------------------------------------------------------------


def model_info(model: str, seq_len: int = 4096, gpus: int = 1) -> str:
    """Parameters, shape, FLOPs per token and memory of a preset, config.json, checkpoint directory or hub id, as
    text. The training memory is `memory_per_gpu`'s, the model `--dry-run` plans with, for one sequence of seq_len
    tokens per GPU (only config.json is read)."""
    from ..config import PRESETS, preset

    cfg = preset(model) if model in PRESETS else load_config(resolve_checkpoint_dir(model, files=["config.json"]))
    n, n_emb = cfg.num_params(), cfg.vocab_size * cfg.hidden_size
    rope = f"llama3 x{cfg.rope_scaling['factor']:g}" if cfg.rope_scaling else "default"

    def gib(n_bytes: float) -> str:
        return f"{n_bytes / 2**30:,.1f} GiB"

    def memory(optim: str, checkpointing: bool) -> dict[str, float]:
        r = Recipe(model=cfg, init_from=None, data=PretrainData(), optim=Optim(name=optim), schedule=Schedule(),
                   train=PretrainTrain(seq_len=seq_len, activation_checkpointing=checkpointing),
                   checkpoint=Checkpoint(), eval=Eval(), stages=[])
        return memory_per_gpu(r, gpus, Stage(seq_len=seq_len, micro_batch=1))

    ademamix, adamw, ckpt = memory("ademamix", False), memory("adamw", False), memory("ademamix", True)
    state = "weights+grads+optimizer (sharded)"
    return "\n".join([
        f"{model}: Apertus, {n / 1e9:.2f}B parameters ({n:,}; {(n - n_emb) / 1e9:.2f}B without the input embedding)",
        f"  layers {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}/"
        f"{cfg.num_key_value_heads} x {cfg.head_dim}, MLP {cfg.intermediate_size} (xIELU), vocab {cfg.vocab_size}",
        f"  RoPE theta {cfg.rope_theta:,.0f} ({rope}), context {cfg.max_position_embeddings:,}",
        f"  FLOPs per token at seq {seq_len}: {cfg.flops_per_token(seq_len) / 1e9:,.1f} GFLOP training "
        f"(6N + 12LHDT), {cfg.flops_per_token(seq_len, training=False) / 1e9:,.1f} GFLOP forward",
        f"  weights: {gib(4 * n)} fp32, {gib(2 * n)} bf16",
        f"  training memory per GPU on {gpus} GPU(s), one sequence of {seq_len} tokens each (as --dry-run plans):",
        f"    fp32 weights + grads + AdEMAMix m1/m2/nu {gib(ademamix[state])} (AdamW: {gib(adamw[state])}), "
        f"gathered parameters {gib(ademamix['gathered parameters'])}, activations {gib(ademamix['activations'])} "
        f"({gib(ckpt['activations'])} with activation checkpointing), loss chunk {gib(ademamix['loss chunk'])}; "
        f"total {gib(sum(ademamix.values()))}"])
