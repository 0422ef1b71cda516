"""What SFT (sft.py) and alignment (qrpo.py) share: their recipe tables, the row source of the shared loop, the
instruct export, the run records and the run skeleton (recipe → trainer → exported checkpoint), and the command's
arguments. The two stages are peers that import this module; neither imports the other.

    apertus sft|align RECIPE [--out DIR] [--set SECTION.KEY=VALUE ...] [--nproc N]
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ApertusConfig, load_toml
from .distributed import Dist, launch, run_job, shutdown, under_torchrun
from .optim import wsd
from .recipe import Optim, Train, apply_override, check_optim, check_train, ensure

PAD = 3


# --- recipe tables (recipe.py's family, post-training defaults) ------------------------------------------------------


@dataclass
class PosttrainTrain(Train):
    batch_size: int = 512  # rows per optimizer step (SFT: packed rows or conversations; alignment: pairs)
    epochs: float = 1.0  # when steps is 0: steps = epochs x rows / batch_size
    val_every: int = 0


@dataclass
class PosttrainOptim(Optim):
    lr: float = 5e-6
    min_lr: float = 0.0  # linear decay ends here
    betas: list = field(default_factory=lambda: [0.9, 0.999, 0.999])
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03  # linear LR warmup over this share of the steps, then linear decay


@dataclass
class Export:
    dir: str = "hf"  # inside the run folder (or an absolute path)
    dtype: str = "bf16"


def check_common(model: ApertusConfig, t: PosttrainTrain, o: PosttrainOptim, world_size: int):
    ensure(t.seq_len > 0 and t.batch_size > 0 and t.micro_batch > 0, "[train] seq_len, batch_size and micro_batch "
           "must be positive")
    ensure(t.seq_len <= model.max_position_embeddings, f"[train] seq_len {t.seq_len} exceeds the model's context "
           f"{model.max_position_embeddings}")
    ensure(t.batch_size % (t.micro_batch * world_size) == 0, f"[train] batch_size {t.batch_size} is not divisible by "
           f"micro_batch x ranks = {t.micro_batch} x {world_size}")
    ensure(t.epochs > 0 or t.steps > 0, "[train] needs epochs > 0 or steps > 0")
    check_train(t)
    check_optim(o)
    ensure(0 <= o.warmup_ratio < 1, "[optim] need 0 <= warmup_ratio < 1")


def load_recipe(recipe: str | Path | dict, parse: Callable, overrides=(), init_from: str | Path | None = None,
                world_size: int | None = None):
    """A recipe file or dict through `parse`, with `--set`-style overrides; `init_from` (a checkpoint) replaces
    [model]: the checkpoint defines the model, its config and (unless given) its tokenizer."""
    d = copy.deepcopy(recipe) if isinstance(recipe, dict) else load_toml(recipe)
    for item in overrides:
        apply_override(d, item)
    if init_from is not None:
        d["model"] = {"init_from": str(init_from)}
    return parse(d, int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size)


# --- rows: the step source, schedule ---------------------------------------------------------------------------------


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


# --- tokenizer, export, run files ------------------------------------------------------------------------------------


def load_tokenizer(path: str | None, init_from: str | None, vocab_size: int):
    from ..tokenizer import Tokenizer, tokenizer_file

    source = path or init_from
    if not source:
        raise ValueError("recipe: [data] tokenizer is not set and there is no [model] init_from to take it from")
    tok = Tokenizer.from_file(tokenizer_file(source))
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
    from ..compliance.manifest import expand_artifacts, hash_files, record_training_run
    from ..util import atomic_write_json

    m = record_training_run(out, kind, parents=parent_runs(init_from))
    m["artifacts"].update(hash_files(out, expand_artifacts(out, [p for p in extra if (out / p).exists()])))
    atomic_write_json(out / "run.json", m)


def log(d: Dist, text: str):
    if d.main:
        from tqdm import tqdm

        tqdm.write(text)


# --- the run skeleton and the command ----------------------------------------------------------------------------


def run(kind: str, parse: Callable, trainer: Callable, recipe: str | Path | dict, out_dir: str | Path, *,
        init_from: str | Path | None = None, overrides=()) -> Path:
    """Parse the recipe, train into out_dir (an existing one resumes), leave the process group; returns the instruct
    checkpoint. RuntimeError if stopped before the end (SIGTERM: the checkpoint is saved, calling again resumes)."""
    parsed = load_recipe(recipe, parse, overrides, init_from)
    try:
        result = trainer(parsed, out_dir)
    finally:
        shutdown()
    hf = Path(out_dir) / parsed.export.dir
    if not (hf / "model.safetensors").exists():
        raise RuntimeError(f"{kind}: stopped at step {result['step']} before the end; run again to resume")
    return hf


def main(argv: list[str] | None, module: str, parse: Callable, trainer: Callable, example: str) -> int:
    """`python -m apertus.train.sft|qrpo` (what torchrun starts): the same arguments as `apertus sft|align`."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog=f"python -m {module}", description="from a TOML recipe (under torchrun for "
                                "several processes)")
    add_arguments(p, example)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.entry = (module, argv)
    return command(args, parse, trainer)


def add_arguments(p, example: str) -> None:
    """The arguments of `apertus sft` / `apertus align` (and of `python -m apertus.train.sft|qrpo`)."""
    p.add_argument("recipe", help=f"TOML recipe, e.g. {example}")
    p.add_argument("--out", help="run directory (default runs/<recipe name>); an existing run resumes")
    p.add_argument("--nproc", type=int, default=1, help="processes (devices) on this machine, via torchrun")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set train.epochs=2 (repeatable)")


def command(args, parse: Callable, trainer: Callable) -> int:
    """Run the parsed command in this process, or (--nproc N) the same command line again as N processes under
    torchrun: `args.entry` = (module, argv) of the command line that parsed these arguments."""
    if args.nproc > 1 and not under_torchrun():
        return launch(*args.entry, args.nproc)
    out = args.out or str(Path("runs") / Path(args.recipe).stem)
    return run_job(trainer, load_recipe(args.recipe, parse, args.set), out)
