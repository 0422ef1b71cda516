"""Supervised fine-tuning on the Apertus chat format (docs/recipe.md §6.1), on the shared training loop.

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

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..chat import CHAT_FORMATS
from ..config import ApertusConfig
from .chat_data import SKIP_REASONS, encode, read_sources
from .distributed import Dist, all_reduce_sum, init_distributed
from .loop import to_device, train
from .loss import lm_loss
from .posttrain import (
    PAD,
    Export,
    PosttrainOptim,
    PosttrainTrain,
    RowSource,
    check_common,
    export_instruct,
    load_tokenizer,
    log,
    record_run,
    run_date,
    schedule,
    total_steps,
    write_run_files,
)
from .posttrain import command as posttrain_command
from .posttrain import main as posttrain_main
from .posttrain import run as posttrain_run
from .pretrain import training_model
from .recipe import Checkpoint, ensure, loop_config, make_optimizer, parse_model, parse_tables

# --- recipe -----------------------------------------------------------------------------------------------------------


@dataclass
class SFTData:
    sources: list = field(default_factory=list)  # [{format, path, limit, skip, system}] (chat_data.py)
    val_sources: list = field(default_factory=list)  # held-out conversations: validation loss
    tokenizer: str | None = None  # tokenizer.json; default: the init_from checkpoint's
    date: str = ""  # "Current date" of the default system prompt; "": the day the run starts (kept on resume)
    format: str = "apertus-sft"  # chat format: "apertus-sft" (Apertus' SFT template) or "release" (chat.encode_chat)
    packing: bool = True


@dataclass
class SFTRecipe:
    model: ApertusConfig
    init_from: str | None
    data: SFTData
    train: PosttrainTrain
    optim: PosttrainOptim
    checkpoint: Checkpoint
    export: Export


def parse_sft_recipe(d: dict, world_size: int = 1) -> SFTRecipe:
    model, init_from = parse_model(d.get("model"))
    t = parse_tables(d, {"data": SFTData, "train": PosttrainTrain, "optim": PosttrainOptim, "checkpoint": Checkpoint,
                         "export": Export})
    r = SFTRecipe(model=model, init_from=init_from, **t)
    ensure(bool(r.data.sources), "[data] sources is empty: list the chat data, e.g. sources = [{format = \"gsm8k\", "
           "path = \"gsm8k/train.jsonl\"}]")
    ensure(r.data.format in CHAT_FORMATS, f"[data] format {r.data.format!r} must be one of {', '.join(CHAT_FORMATS)}")
    check_common(model, r.train, r.optim, world_size)
    ensure(r.export.dtype in ("bf16", "fp32"), "[export] dtype must be 'bf16' or 'fp32'")
    return r


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


# --- SFT -------------------------------------------------------------------------------------------------------------


def encode_all(tokenizer, conversations: list[dict], max_len: int, date: str, format: str = "apertus-sft"):
    """(examples, skip counts) for the conversations that can be trained on."""
    examples, skipped = [], dict.fromkeys(SKIP_REASONS, 0)
    for conv in conversations:
        out = encode(tokenizer, conv, max_len, date, format=format)
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
            loss, n = lm_loss(model, to_device(b, d.device), goldfish=None)
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
    examples, skipped = encode_all(tok, read_sources(recipe.data.sources), t.seq_len + 1, date,
                                   recipe.data.format)
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
    optimizer = make_optimizer(model, o, steps, compile=t.compile)
    source = RowSource(len(rows), t.batch_size, t.micro_batch, d, t.seed,
                       lambda idx: collate(examples, [rows[i] for i in idx]))

    def loss_fn(model, batch):
        return lm_loss(model, batch, goldfish=None, document_masking=True, compile=t.compile)

    cfg = loop_config("sft", out, steps, schedule(o, steps), t, recipe.checkpoint, model.config.flops_per_token,
                      t.val_every)
    result = train(model, optimizer, source, loss_fn, cfg, d, validate)
    if result["step"] < steps:  # stopped by SIGTERM: the checkpoint is saved, the run is not finished
        return result
    hf = export_instruct(model, out / recipe.export.dir, tok, d, recipe.export.dtype)
    if d.main:
        record_run(out, "sft", recipe.init_from, ["sft_data.json"])
        log(d, f"sft: wrote the instruct checkpoint {hf}")
    return result


def run(recipe: str | Path | dict, out_dir: str | Path, *, init_from: str | Path | None = None,
        overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """The Python entry point (the speedrun, notebooks): an SFT run from a recipe file or dict, with `--set`-style
    overrides ("train.epochs=2") and the starting checkpoint `init_from` (replaces [model]). An existing out_dir
    resumes. Returns the instruct checkpoint out_dir/hf; RuntimeError if stopped before the end (SIGTERM: the
    checkpoint is saved and calling again resumes)."""
    return posttrain_run("sft", parse_sft_recipe, sft, recipe, out_dir, init_from=init_from, overrides=overrides)


def command(args) -> int:
    """`apertus sft` (posttrain.add_arguments)."""
    return posttrain_command(args, parse_sft_recipe, sft)


EXAMPLE = "recipes/sft_tiny.toml"


def main(argv: list[str] | None = None) -> int:
    return posttrain_main(argv, "apertus.train.sft", parse_sft_recipe, sft, EXAMPLE)


if __name__ == "__main__":
    sys.exit(main())
