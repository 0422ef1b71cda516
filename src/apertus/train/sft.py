"""Supervised fine-tuning on the Apertus chat format (SPEC §6.1), on the shared training loop.

    apertus sft recipes/sft_tiny.toml [--out DIR] [--set train.epochs=2 ...] [--nproc N]
    torchrun --nproc-per-node 8 -m apertus.train.sft recipes/sft_apertus-8b.toml

Conversations (chat_data.py) are rendered with the chat format; the loss counts only the tokens the assistant wrote
(its text, reasoning, tool calls and `<|assistant_end|>`), averaged over all of them in the global batch. With
packing, conversations are laid end to end in rows of `seq_len` tokens and attention stays inside each one (position
ids restart per conversation → `document_mask`); without it, each row holds one conversation, padded. Optimizer:
AdEMAMix with α and β3 warmed up over the whole run, linear warmup then linear decay of the LR. The result is exported
as an instruct checkpoint (generation config stops on 2, 68, 72; the tokenizer files carry the chat template).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import resolve_checkpoint_dir
from ..config import ApertusConfig, load_config, load_toml, model_config_from
from .chat_data import SKIP_REASONS, encode, read_sources
from .distributed import Dist, all_reduce_sum, init_distributed, run_job, shutdown
from .loop import LoopConfig, _to, train
from .loss import lm_loss
from .optim import build_optimizer, wsd
from .pretrain import build_model_for
from .recipe import Checkpoint, _check, _table, apply_override

PAD = 3


# --- recipe -----------------------------------------------------------------------------------------------------------


@dataclass
class Data:
    sources: list = field(default_factory=list)  # [{format, path, limit, skip, system}] (chat_data.py)
    val_sources: list = field(default_factory=list)  # held-out conversations: validation loss
    tokenizer: str | None = None  # tokenizer.json; default: the init_from checkpoint's
    date: str = ""  # "Current date" of the default system prompt; "": the day the run starts (kept on resume)
    format: str = "apertus-sft"  # chat format: "apertus-sft" (Apertus' SFT template) or "release" (chat.encode_chat)
    packing: bool = True


@dataclass
class Train:
    seq_len: int = 4096  # longest row (SFT: conversation or pack; alignment: prompt + completion)
    batch_size: int = 512  # rows per optimizer step (SFT: packed rows or conversations; alignment: pairs)
    micro_batch: int = 1  # rows per forward pass and rank
    epochs: float = 1.0
    steps: int = 0  # 0: epochs x rows / batch_size
    seed: int = 0
    dtype: str = "bf16"
    grad_clip: float = 1.0
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp_param_dtype: str = "fp32"
    log_every: int = 1
    val_every: int = 0


@dataclass
class Optim:
    name: str = "ademamix"
    lr: float = 5e-6
    min_lr: float = 0.0  # linear decay ends here
    betas: list = field(default_factory=lambda: [0.9, 0.999, 0.999])
    alpha: float = 8.0
    t_alpha: int = 0  # 0: the run's total steps (SPEC §6.1: t_α = t_β3 = total steps)
    t_beta3: int = 0
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03


@dataclass
class Export:
    dir: str = "hf"  # inside the run folder (or an absolute path)
    dtype: str = "bf16"


@dataclass
class SFTRecipe:
    model: ApertusConfig
    init_from: str | None
    data: Data
    train: Train
    optim: Optim
    checkpoint: Checkpoint
    export: Export


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
    unknown = sorted(set(d) - set(tables) - {"model"})
    if unknown:
        raise ValueError(f"recipe: unknown section(s) {', '.join(unknown)} (known: model, {', '.join(tables)})")
    return {name: _table(cls, d.get(name), name) for name, cls in tables.items()}


def check_common(model: ApertusConfig, t: Train, o: Optim, world_size: int):
    _check(t.seq_len > 0 and t.batch_size > 0 and t.micro_batch > 0, "[train] seq_len, batch_size and micro_batch "
           "must be positive")
    _check(t.seq_len <= model.max_position_embeddings, f"[train] seq_len {t.seq_len} exceeds the model's context "
           f"{model.max_position_embeddings}")
    _check(t.batch_size % (t.micro_batch * world_size) == 0, f"[train] batch_size {t.batch_size} is not divisible by "
           f"micro_batch x ranks = {t.micro_batch} x {world_size}")
    _check(t.epochs > 0 or t.steps > 0, "[train] needs epochs > 0 or steps > 0")
    _check(t.dtype in ("bf16", "fp32") and t.fsdp_param_dtype in ("bf16", "fp32"), "[train] dtype and "
           "fsdp_param_dtype must be 'bf16' or 'fp32'")
    _check(o.name in ("ademamix", "adamw") and len(o.betas) in (2, 3) and all(0 <= b < 1 for b in o.betas),
           "[optim] name must be 'ademamix' or 'adamw' with betas in [0, 1) (three for AdEMAMix)")
    _check(o.name == "adamw" or len(o.betas) == 3, "[optim] AdEMAMix needs three betas")
    _check(o.lr > 0 and 0 <= o.min_lr <= o.lr and 0 <= o.warmup_ratio < 1, "[optim] need lr > 0, 0 <= min_lr <= lr "
           "and 0 <= warmup_ratio < 1")


def parse_sft_recipe(d: dict, world_size: int = 1) -> SFTRecipe:
    model, init_from = parse_model(d.get("model"))
    t = parse_tables(d, {"data": Data, "train": Train, "optim": Optim, "checkpoint": Checkpoint, "export": Export})
    r = SFTRecipe(model=model, init_from=init_from, **t)
    _check(bool(r.data.sources), "[data] sources is empty: list the chat data, e.g. sources = [{format = \"gsm8k\", "
           "path = \"gsm8k/train.jsonl\"}]")
    check_common(model, r.train, r.optim, world_size)
    _check(r.export.dtype in ("bf16", "fp32"), "[export] dtype must be 'bf16' or 'fp32'")
    return r


def load_recipe_file(path, parse, world_size: int = 1, overrides=()):
    d = load_toml(path)
    for item in overrides:
        apply_override(d, item)
    return parse(d, world_size)


# --- rows: packing, batches, the step source -------------------------------------------------------------------------


def pack(lengths: list[int], seq_len: int, packing: bool, seed: int) -> list[list[int]]:
    """Rows of example indices: in a seeded shuffled order, examples are laid end to end while they fit in seq_len
    tokens (each example of n ids takes n - 1 input positions); without packing, one example per row."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    if not packing:
        return [[i] for i in order]
    rows, row, used = [], [], 0
    for i in order:
        n = lengths[i] - 1
        if row and used + n > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(row)
    return rows


def collate(examples: list[tuple[list[int], list[bool]]], rows: list[list[int]]) -> dict:
    """A micro-batch of rows (PackedLoader fields): inputs ids[:-1] and labels ids[1:] of each conversation, the loss
    on labels the assistant wrote, positions restarting per conversation; padded to the longest row (pad positions
    restart too, so padding attends only to padding)."""
    T = max([1] + [sum(len(examples[i][0]) - 1 for i in row) for row in rows])
    out = {k: [] for k in ("input_ids", "labels", "loss_mask", "position_ids")}
    for row in rows:
        ids, labels, mask, pos = [], [], [], []
        for i in row:
            x, m = examples[i]
            ids += x[:-1]
            labels += x[1:]
            mask += m[1:]
            pos += range(len(x) - 1)
        pad = T - len(ids)
        out["input_ids"].append(ids + [PAD] * pad)
        out["labels"].append(labels + [PAD] * pad)
        out["loss_mask"].append(mask + [False] * pad)
        out["position_ids"].append(pos + list(range(pad)))
    return {k: torch.tensor(v, dtype=torch.bool if k == "loss_mask" else torch.long) for k, v in out.items()}


class RowSource:
    """The loop's batch source over a fixed list of rows, reshuffled every epoch (seeded): step k takes global rows
    [k·B, (k+1)·B) of the epochs laid end to end; rank r gets rows r::w, in micro-batches (`collate(row ids)`).
    Exact resume needs only the step."""

    def __init__(self, n_rows: int, batch_size: int, micro_batch: int, d: Dist, seed: int, collate):
        self.n, self.batch_size, self.micro_batch, self.d, self.seed = n_rows, batch_size, micro_batch, d, seed
        self.collate, self.step, self._epoch, self._perm = collate, 0, None, None

    def _row(self, j: int) -> int:
        epoch, k = divmod(j, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm[k]

    def next_step(self) -> list[dict]:
        start = self.step * self.batch_size
        mine = [self._row(j) for j in range(start + self.d.rank, start + self.batch_size, self.d.world_size)]
        self.step += 1
        return [self.collate(mine[i:i + self.micro_batch]) for i in range(0, len(mine), self.micro_batch)]

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict):
        self.step = state["step"]


def total_steps(t: Train, n_rows: int) -> int:
    return t.steps or max(1, math.ceil(t.epochs * n_rows / t.batch_size))


def schedule(o: Optim, steps: int):
    """Linear warmup over warmup_ratio of the steps, then linear decay to min_lr (transformers' linear schedule)."""
    warm = round(o.warmup_ratio * steps)
    return lambda step, tokens: wsd(step, peak=o.lr, total=steps, warmup=warm, cooldown=steps - warm,
                                    min_lr=o.min_lr, decay="linear")


def make_optimizer(model, o: Optim, steps: int):
    return build_optimizer(model, o.name, lr=o.lr, betas=o.betas, alpha=o.alpha, t_alpha=o.t_alpha or steps,
                           t_beta3=o.t_beta3 or steps, eps=o.eps, weight_decay=o.weight_decay)


def training_model(recipe, d: Dist):
    t = recipe.train
    return build_model_for(recipe.model, d, init_from=recipe.init_from, seed=t.seed,
                           activation_checkpointing=t.activation_checkpointing, compile=t.compile,
                           param_dtype=torch.bfloat16 if t.fsdp_param_dtype == "bf16" else None)


# --- tokenizer, export, run files ------------------------------------------------------------------------------------


def load_tokenizer(path: str | None, init_from: str | None, vocab_size: int):
    from ..tokenizer import Tokenizer

    source = path or init_from
    if not source:
        raise ValueError("recipe: [data] tokenizer is not set and there is no [model] init_from to take it from")
    tok = Tokenizer.from_file(source)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer ({source}) has {tok.vocab_size:,} ids, more than the model's vocabulary "
                         f"({vocab_size:,})")
    for name in ("<|assistant_start|>", "<|assistant_end|>"):
        tok.token_id(name)  # a tokenizer without the Apertus specials cannot carry the chat format
    return tok


def instruct_tokenizer_files(tokenizer) -> dict[str, str]:
    """tokenizer.json, the instruct tokenizer_config.json with the chat template in it (what transformers and vLLM
    read), and chat_template.jinja."""
    import tempfile

    from ..chat import official_template

    template = official_template()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp, chat_template=template)
        files = {f.name: f.read_text(encoding="utf-8") for f in Path(tmp).iterdir()}
    config = json.loads(files["tokenizer_config.json"])
    config["chat_template"] = template
    files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    return files


def export_instruct(model, out: Path, tokenizer, d: Dist, dtype: str) -> Path:
    """The trained weights (gathered from the FSDP shards) as a Hugging Face instruct checkpoint (all ranks call)."""
    from ..checkpoint import save_model
    from ..model import build_model
    from .distributed import barrier, full_state_dict

    state = full_state_dict(model)
    if d.main:
        plain = build_model(model.config, device="meta")
        plain.to_empty(device="cpu")
        plain.load_state_dict(state)
        save_model(plain, out, dtype=dtype, instruct=True, extra_files=instruct_tokenizer_files(tokenizer))
    barrier()
    return out


def run_date(recipe_date: str, out: Path) -> str:
    """The recipe's date, else the one a previous start of this run used (so a resumed run renders the same
    conversations), else today."""
    if recipe_date:
        return recipe_date
    previous = out / "recipe.json"
    if previous.exists():
        old = json.loads(previous.read_text()).get("data", {}).get("date")
        if old:
            return old
    return datetime.date.today().isoformat()


def write_run_files(recipe, out: Path, d: Dist, extra: dict | None = None):
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        blob = dataclasses.asdict(recipe) | (extra or {})
        (out / "recipe.json").write_text(json.dumps(blob, indent=1, default=str))


def parent_runs(init_from: str | None) -> list[Path]:
    """Run folders with a run.json that the start checkpoint came from (the checkpoint itself or its run)."""
    if not init_from:
        return []
    p = Path(init_from)
    return [q for q in (p, p.parent) if (q / "run.json").exists()]


def record_run(out: Path, kind: str, init_from: str | None, extra: list[str]):
    """run.json (compliance manifest) of the loop's files, plus this stage's own artifacts (data stats, rollouts,
    evaluation samples) hashed alongside."""
    from ..compliance.manifest import _expand, hash_files, record_training_run, write_json_atomic

    m = record_training_run(out, kind, parents=parent_runs(init_from))
    m["artifacts"].update(hash_files(out, _expand(out, [p for p in extra if (out / p).exists()])))
    write_json_atomic(out / "run.json", m)


def log(d: Dist, text: str):
    if d.main:
        from tqdm import tqdm

        tqdm.write(text)


# --- SFT -------------------------------------------------------------------------------------------------------------


def encode_all(tokenizer, conversations: list[dict], max_len: int, date: str, format: str = "apertus-sft"):
    """(examples, skip counts) for the conversations that can be trained on."""
    examples, skipped = [], dict.fromkeys(SKIP_REASONS, 0)
    for conv in conversations:
        out = encode(tokenizer, conv, max_len, date, format)
        if isinstance(out, str):
            skipped[out] += 1
        else:
            examples.append(out)
    return examples, skipped


def make_validate(examples, rows: list[list[int]], micro_batch: int, d: Dist):
    """Mean loss over the assistant tokens of held-out conversations. The row list is padded with empty rows to a
    multiple of micro_batch x ranks, so every rank runs the same number of forward passes."""
    per = micro_batch * d.world_size
    rows = rows + [[]] * (-len(rows) % per)
    mine = rows[d.rank::d.world_size]
    batches = [collate(examples, mine[i:i + micro_batch]) for i in range(0, len(mine), micro_batch)]

    def validate(model) -> dict[str, float]:
        s = torch.zeros(2, dtype=torch.float64, device=d.device)
        for b in batches:
            loss, n = lm_loss(model, _to(b, d.device), goldfish=None)
            s[0] += loss
            s[1] += n
        s = all_reduce_sum(s).tolist()
        return {"loss": s[0] / max(s[1], 1)}

    return validate


def sft(recipe: SFTRecipe, out_dir: str | Path, d: Dist | None = None) -> dict:
    """Fine-tune (or resume) into out_dir; exports the instruct checkpoint to out_dir/hf; returns the last metrics."""
    d = d or init_distributed()
    out = Path(out_dir)
    t, o = recipe.train, recipe.optim
    torch.manual_seed(t.seed)
    tok = load_tokenizer(recipe.data.tokenizer, recipe.init_from, recipe.model.vocab_size)
    date = run_date(recipe.data.date, out)
    examples, skipped = encode_all(tok, read_sources(recipe.data.sources), t.seq_len + 1, date, recipe.data.format)
    if not examples:
        raise ValueError(f"sft: no conversation left to train on (skipped: {skipped})")
    rows = pack([len(x) for x, _ in examples], t.seq_len, recipe.data.packing, t.seed)
    steps = total_steps(t, len(rows))
    n_tokens = sum(len(x) - 1 for x, _ in examples)
    stats = {"conversations": len(examples), "skipped": skipped, "rows": len(rows), "tokens": n_tokens,
             "assistant_tokens": sum(sum(m[1:]) for _, m in examples), "steps": steps, "date": date,
             "fill": n_tokens / (len(rows) * t.seq_len)}
    log(d, f"sft: {len(examples):,} conversations ({n_tokens:,} tokens, {stats['assistant_tokens']:,} trained on) in "
           f"{len(rows):,} rows ({100 * stats['fill']:.0f}% full), {steps:,} steps; skipped "
           + ", ".join(f"{k} {v}" for k, v in skipped.items()))
    validate = None
    if recipe.data.val_sources:
        val_examples, val_skipped = encode_all(tok, read_sources(recipe.data.val_sources), t.seq_len + 1, date,
                                               recipe.data.format)
        stats["val"] = {"conversations": len(val_examples), "skipped": val_skipped}
        if val_examples:
            val_rows = pack([len(x) for x, _ in val_examples], t.seq_len, recipe.data.packing, t.seed)
            validate = make_validate(val_examples, val_rows, t.micro_batch, d)
    write_run_files(recipe, out, d, {"data": dataclasses.asdict(recipe.data) | {"date": date}})
    if d.main:
        (out / "sft_data.json").write_text(json.dumps(stats, indent=1))

    model = training_model(recipe, d)
    optimizer = make_optimizer(model, o, steps)
    source = RowSource(len(rows), t.batch_size, t.micro_batch, d, t.seed,
                       lambda idx: collate(examples, [rows[i] for i in idx]))

    def loss_fn(model, batch):
        return lm_loss(model, batch, goldfish=None, document_masking=True)

    cfg = LoopConfig(out_dir=out, steps=steps, lr=schedule(o, steps), grad_clip=t.grad_clip or None, dtype=t.dtype,
                     flops_per_token=model.config.flops_per_token, log_every=t.log_every, val_every=t.val_every,
                     ckpt_every=recipe.checkpoint.every, keep_last=recipe.checkpoint.keep_last,
                     permanent_every=recipe.checkpoint.permanent_every, name="sft")
    result = train(model, optimizer, source, loss_fn, cfg, d, validate)
    if result["step"] < steps:  # stopped by SIGTERM: the checkpoint is saved, the run is not finished
        return result
    hf = export_instruct(model, out / recipe.export.dir, tok, d, recipe.export.dtype)
    if d.main:
        record_run(out, "sft", recipe.init_from, ["sft_data.json"])
        log(d, f"sft: wrote the instruct checkpoint {hf}")
    return result


def _parse(recipe: str | Path | dict, kind: str, overrides=(), init_from: str | Path | None = None):
    d = copy.deepcopy(recipe) if isinstance(recipe, dict) else load_toml(recipe)
    for item in overrides:
        apply_override(d, item)
    if init_from is not None:  # the checkpoint defines the model: its config and (unless given) its tokenizer
        d["model"] = {"init_from": str(init_from)}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if kind == "sft":
        return parse_sft_recipe(d, world), sft
    from .qrpo import align, parse_align_recipe

    return parse_align_recipe(d, world), align


def run(recipe: str | Path | dict, out_dir: str | Path, *, init_from: str | Path | None = None,
        overrides: list[str] | tuple[str, ...] = (), kind: str = "sft") -> Path:
    """The Python entry point (the speedrun, notebooks): an SFT run (kind="align": QRPO/DPO) from a recipe file or
    dict, with `--set`-style overrides ("train.epochs=2") and the starting checkpoint `init_from` (replaces [model]).
    An existing out_dir resumes. Returns the instruct checkpoint out_dir/hf; RuntimeError if stopped before the end
    (SIGTERM: the checkpoint is saved and calling again resumes)."""
    parsed, fn = _parse(recipe, kind, overrides, init_from)
    try:
        result = fn(parsed, out_dir)
    finally:
        shutdown()
    hf = Path(out_dir) / parsed.export.dir
    if not (hf / "model.safetensors").exists():
        raise RuntimeError(f"{kind}: stopped at step {result['step']} before the end; run again to resume")
    return hf


def main(argv: list[str] | None = None, kind: str = "sft") -> int:
    p = argparse.ArgumentParser(prog=f"python -m apertus.train.{'sft' if kind == 'sft' else 'qrpo'}",
                                description=f"{kind} from a TOML recipe (under torchrun for several processes)")
    p.add_argument("recipe")
    p.add_argument("--out", help="run directory (default runs/<recipe name>); an existing run resumes")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a recipe value")
    args = p.parse_args(argv)
    out = args.out or str(Path("runs") / Path(args.recipe).stem)
    recipe, fn = _parse(args.recipe, kind, args.set)
    return run_job(fn, recipe, out)


if __name__ == "__main__":
    sys.exit(main())
