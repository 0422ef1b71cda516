"""Pretraining (docs/recipe.md §2–§4): a recipe → model, optimizer, curriculum over a built dataset → the shared loop.

    python -m apertus.train recipes/tiny.toml [--out DIR] [--set train.steps=100 ...] [--dry-run --gpus N]
    torchrun --nproc-per-node 8 -m apertus.train recipes/apertus-8b.toml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..tokenizer import tokenizer_file
from .distributed import Dist, all_reduce_sum, init_distributed, launch, parallelize, run_job, under_torchrun
from .loop import to_device, train
from .loss import lm_loss, token_byte_lengths, token_cross_entropy
from .recipe import Recipe, Stage, load_recipe, loop_config, make_optimizer, plan


class PretrainSource:
    """The micro-batches of each optimizer step, following the recipe's stages.

    At a stage boundary the data stream restarts with the stage's data and seed (docs/recipe.md §4.2) when they or the
    sequence length change, and the model's RoPE θ is set to the stage's (docs/recipe.md §4.4). `make_loader(stage)`
    returns an object following the batch contract of apertus.data.loader that yields this rank's micro-batches.
    """

    def __init__(self, recipe: Recipe, model, d: Dist, make_loader: Callable[[Stage], object]):
        self.recipe, self.model, self.d, self.make_loader = recipe, model, d, make_loader
        self.base_theta = model.config.rope_theta
        self.step, self.index, self.loader, self.it = 0, None, None, None

    @property
    def stage(self) -> Stage:
        """The stage of the micro-batches handed out last (what the loss of the current step is computed on)."""
        return self.recipe.stages[self.index if self.index is not None else self.recipe.stage_at(self.step)]

    def _enter(self, index: int, loader_state: dict | None = None):
        new = self.recipe.stages[index]
        old = self.recipe.stages[self.index] if self.index is not None else None
        if old is None or loader_state is not None or (old.data, old.seed, old.seq_len) != (new.data, new.seed,
                                                                                              new.seq_len):
            self.loader = self.make_loader(new)
            if loader_state is not None:
                self.loader.load_state_dict(loader_state)
            self.it = iter(self.loader)
        theta = new.rope_theta or self.base_theta
        if theta != self.model.config.rope_theta:
            self.model.set_rope(theta)
        self.index = index

    def next_step(self) -> list[dict]:
        index = self.recipe.stage_at(self.step)
        if index != self.index:
            self._enter(index)
        s = self.recipe.stages[index]
        accum = s.global_batch_tokens // (s.seq_len * s.micro_batch * self.d.world_size)
        self.step += 1
        return [next(self.it) for _ in range(accum)]

    def state_dict(self) -> dict:
        return {"step": self.step, "stage": self.index, "loader": self.loader.state_dict() if self.loader else None}

    def load_state_dict(self, state: dict):
        self.step, self.index = state["step"], None
        if state["stage"] is not None:
            self._enter(state["stage"], state["loader"])


def packed_loader(recipe: Recipe, d: Dist, split: str = "train") -> Callable[[Stage], object]:
    """Stage → PackedLoader over the recipe's built dataset: each call gives this rank its micro-batch of rows r::w
    of the next `micro_batch x ranks` global rows."""
    if not recipe.data.dataset:
        raise ValueError("recipe: [data] dataset is not set (a directory built by `apertus data build`)")
    if not Path(recipe.data.dataset).is_dir():
        raise FileNotFoundError(f"{recipe.data.dataset}: dataset directory not found (build it with "
                                "`apertus data build`)")
    from ..data.loader import PackedLoader

    def make(stage: Stage):
        return PackedLoader(recipe.data.dataset, stage.seq_len, stage.micro_batch, stage=stage.data, split=split,
                            seed=stage.seed, rank=d.rank, world_size=d.world_size)

    return make


def dataset_val_batches(dataset: str | Path, seq_len: int, micro_batch: int, n_batches: int, d: Dist,
                        languages: list[str] | None = None, top: int = 4) -> dict[str, list[dict]]:
    """Held-out documents of a built dataset, per language, packed like training rows (document masking, position
    reset, EoD inputs masked): up to n_batches micro-batches per rank and language. Languages: the given ones, else
    the `top` with the most held-out tokens. Every rank gets the same number of batches (rows r::w)."""
    import numpy as np

    from ..data.loader import val_documents
    from ..model import packed_position_ids

    by_lang: dict[str, list] = {}
    for doc in val_documents(dataset):
        by_lang.setdefault(doc["language"], []).append(doc["tokens"])
    if languages:
        missing = sorted(set(languages) - set(by_lang))
        if missing:
            raise ValueError(f"[eval] languages {', '.join(missing)} have no held-out documents in {dataset}")
    else:
        languages = sorted(by_lang, key=lambda k: -sum(len(t) for t in by_lang[k]))[:top]
    out = {}
    for lang in languages:
        stream = torch.from_numpy(np.concatenate(by_lang[lang]).astype(np.int64))
        per_step = micro_batch * d.world_size
        n_rows = min((len(stream) - 1) // seq_len // per_step, n_batches) * per_step
        if n_rows == 0:
            continue
        rows = torch.stack([stream[j * seq_len:j * seq_len + seq_len + 1] for j in range(d.rank, n_rows,
                                                                                          d.world_size)])
        batches = []
        for x in rows.split(micro_batch):
            inputs, labels = x[:, :-1], x[:, 1:]
            starts = torch.zeros_like(inputs, dtype=torch.bool)
            starts[:, 1:] = inputs[:, :-1] == 2
            batches.append({"input_ids": inputs, "labels": labels, "loss_mask": inputs != 2,
                            "position_ids": packed_position_ids(starts)})
        out[lang] = batches
    return out


def make_validate(val: dict[str, list[dict]], token_bytes: torch.Tensor | None, d: Dist):
    """Validation over fixed held-out batches per language: mean loss (nats/token on loss_mask, no Goldfish) and
    bits per byte (loss of the text tokens / their UTF-8 bytes; special tokens carry no bytes)."""
    from ..model import document_mask

    table = token_bytes.to(d.device) if token_bytes is not None else None

    def validate(model) -> dict[str, float]:
        out = {}
        for lang, batches in val.items():
            s = torch.zeros(4, dtype=torch.float64, device=d.device)  # nats, tokens, text nats, bytes
            for b in batches:
                b = to_device(b, d.device)
                pos = b["position_ids"]
                hidden = model.hidden_states(b["input_ids"], position_ids=pos, attn_mask=document_mask(pos))
                ce = token_cross_entropy(hidden, model.lm_head.weight, b["labels"])
                mask = b["loss_mask"]
                s[0] += (ce * mask).sum()
                s[1] += mask.sum()
                if table is not None:
                    nbytes = table[b["labels"]] * mask
                    s[2] += (ce * (nbytes > 0)).sum()
                    s[3] += nbytes.sum()
            s = all_reduce_sum(s).tolist()
            out[f"{lang}/loss"] = s[0] / max(s[1], 1)
            if table is not None:
                out[f"{lang}/bpb"] = s[2] / math.log(2) / max(s[3], 1)
        return out

    return validate


def build_model_for(config, d: Dist, *, init_from: str | None = None, seed: int = 0,
                    activation_checkpointing: bool = False, compile: bool = False,
                    param_dtype: torch.dtype | None = None):
    """An Apertus model for training: initialised from `seed`, or loaded from the Hugging Face checkpoint
    `init_from` (with `config`, e.g. the recipe's overrides of it), with parallelism applied (`parallelize`).

    On GPUs under FSDP the model is created on the meta device, sharded, then materialised shard by shard (no rank
    ever holds the whole model); a checkpoint to start from is read by rank 0 and scattered. On CPU every rank
    builds the same full model and FSDP keeps its shard. SFT and alignment start from here too.
    """
    from ..checkpoint import load_model
    from ..model import build_model

    meta = d.device.type == "cuda" and d.sharded
    if meta:
        model = build_model(config, device="meta")
    elif init_from:
        model = load_model(init_from, dtype=torch.float32, device=d.device)
        model.config = config
    else:
        model = build_model(config, device=d.device, seed=seed)
    parallelize(model, d, activation_checkpointing=activation_checkpointing, compile=compile, param_dtype=param_dtype)
    if meta:
        model.to_empty(device=d.device)
        torch.manual_seed(seed)
        model.init_weights()
        if init_from:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            full = load_model(init_from).state_dict() if d.main else {}
            set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                                        broadcast_from_rank0=True))
    return model


def training_model(recipe, d: Dist):
    """The model a recipe trains ([model], [train] seed and parallelism settings), on the ranks of `d`."""
    t = recipe.train
    return build_model_for(recipe.model, d, init_from=recipe.init_from, seed=t.seed,
                           activation_checkpointing=t.activation_checkpointing, compile=t.compile,
                           param_dtype=torch.bfloat16 if t.fsdp_param_dtype == "bf16" else None)


def _dataset_tokenizer(recipe: Recipe) -> str | None:
    """The tokenizer a built dataset was made with (its manifest), checked against the model's vocabulary."""
    if not recipe.data.dataset:
        return None
    manifest = json.loads((Path(recipe.data.dataset) / "manifest.json").read_text())["tokenizer"]
    if manifest["vocab_size"] > recipe.model.vocab_size:
        raise ValueError(f"recipe: [model] vocab_size {recipe.model.vocab_size:,} is smaller than the vocabulary of "
                         f"the dataset's tokenizer ({manifest['vocab_size']:,}, {manifest['path']})")
    return manifest["path"] if Path(manifest["path"]).exists() else None


def _save_run_files(recipe: Recipe, out: Path, d: Dist, tok: str | None):
    if not d.main:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=1, default=str))
    if tok and not (out / "tokenizer" / "tokenizer.json").exists():
        src = Path(tok)
        src = src / "tokenizer.json" if src.is_dir() else src
        (out / "tokenizer").mkdir(exist_ok=True)
        shutil.copy(src, out / "tokenizer" / "tokenizer.json")
        if (src.parent / "tokenizer_config.json").exists():
            shutil.copy(src.parent / "tokenizer_config.json", out / "tokenizer" / "tokenizer_config.json")


def make_sampler(prompts: list[str], tokenizer: str, n_tokens: int, out: Path, source: PretrainSource, d: Dist):
    """After each validation, the model's continuations of `prompts` (temperature 0.8, top-p 0.9, the same seed every
    time) appended to out/samples.jsonl with the step: how noise turns into word shapes, then words. They come from
    an eager copy of the weights (the training blocks may be compiled for one shape); on one rank only."""
    from ..infer.sampler import filtered_probs
    from ..model import Apertus
    from ..tokenizer import Tokenizer

    tok = Tokenizer.from_file(tokenizer)

    @torch.no_grad()
    def sample(model) -> None:
        plain = Apertus(model.config).to(d.device)
        plain.load_state_dict(model.state_dict())
        plain.eval()
        gen = torch.Generator(device=d.device).manual_seed(0)
        one = torch.ones(1, device=d.device)
        rows = []
        for prompt in prompts:
            ids = torch.tensor([tok.encode(prompt)], device=d.device)
            start = ids.shape[1]
            for _ in range(n_tokens):
                probs = filtered_probs(plain(ids)[:, -1].float(), 0.8 * one, 0 * one.long(), 0.9 * one, 0 * one)
                nxt = torch.multinomial(probs, 1, generator=gen)
                if int(nxt) == tok.eos_id:
                    break
                ids = torch.cat([ids, nxt], 1)
            rows.append({"prompt": prompt, "text": tok.decode(ids[0, start:].tolist())})
        with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": source.step, "samples": rows}, ensure_ascii=False) + "\n")

    return sample


def pretrain(recipe: Recipe, out_dir: str | Path, d: Dist | None = None,
             make_loader: Callable[[Stage], object] | None = None, val_batches: dict[str, list[dict]] | None = None,
             token_bytes: torch.Tensor | None = None) -> dict:
    """Train (or resume) a recipe into out_dir. Tests and demos can pass their own loader factory and val batches."""
    d = d or init_distributed()
    out = Path(out_dir)
    t = recipe.train
    torch.manual_seed(t.seed)
    make_loader = make_loader or packed_loader(recipe, d)
    tokenizer = _dataset_tokenizer(recipe)  # also checks the model's vocabulary covers the dataset's ids
    tokenizer = str(tokenizer_file(recipe.data.tokenizer)) if recipe.data.tokenizer else tokenizer
    if val_batches is None and recipe.eval.every and recipe.data.dataset:
        s0 = recipe.stages[0]
        val_batches = dataset_val_batches(recipe.data.dataset, s0.seq_len, s0.micro_batch, recipe.eval.batches, d,
                                          recipe.eval.languages)
    if token_bytes is None and tokenizer:
        token_bytes = token_byte_lengths(tokenizer, recipe.model.vocab_size)
    _save_run_files(recipe, out, d, tokenizer)
    model = training_model(recipe, d)
    optimizer = make_optimizer(model, recipe.optim, recipe.steps, compile=t.compile)
    source = PretrainSource(recipe, model, d, make_loader)
    goldfish = (t.goldfish_k, t.goldfish_h) if t.goldfish_k else None

    def loss_fn(model, batch):
        return lm_loss(model, batch, goldfish=goldfish, document_masking=source.stage.document_masking,
                       compile=t.compile)

    validate = make_validate(val_batches, token_bytes, d) if val_batches else None
    if validate and recipe.eval.prompts and tokenizer and not d.sharded:
        measure = validate
        sample = make_sampler(recipe.eval.prompts, tokenizer, recipe.eval.sample_tokens, out, source, d)

        def validate(model):
            result = measure(model)
            if d.main:
                sample(model)
            return result
    cfg = loop_config("pretrain", out, recipe.steps, recipe.lr_at, t, recipe.checkpoint, model.config.flops_per_token,
                      recipe.eval.every)
    result = train(model, optimizer, source, loss_fn, cfg, d, validate)
    if d.main:  # run.json: resolved recipe, seeds, code, hashes of the checkpoints, tokens, FLOPs, energy
        from ..compliance.manifest import record_training_run

        # wall time from the metrics' timestamps (None): it spans every resumed part of the run, not just this one
        record_training_run(out, "pretrain", wall_time=None)
    return result


def run(recipe: str | Path | dict, out_dir: str | Path, *, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The Python entry point (the speedrun, notebooks): pretrain a recipe file or dict with `--set`-style overrides
    into out_dir (an existing one resumes); returns the last step's metrics."""
    from .distributed import shutdown
    from .recipe import apply_override, parse_recipe

    if isinstance(recipe, dict):
        d = json.loads(json.dumps(recipe))  # a deep copy: the overrides must not change the caller's dict
        for item in overrides:
            apply_override(d, item)
        parsed = parse_recipe(d, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    else:
        parsed = load_recipe(recipe, world_size=int(os.environ.get("WORLD_SIZE", "1")), overrides=overrides)
    try:
        return pretrain(parsed, out_dir)
    finally:
        shutdown()


def add_arguments(p) -> None:
    """The arguments of `apertus train` (and of `python -m apertus.train`, what torchrun starts)."""
    p.add_argument("recipe", help="TOML recipe, e.g. recipes/tiny.toml")
    p.add_argument("--nproc", type=int, default=1, help="processes (devices) on this machine, via torchrun")
    p.add_argument("--out", help="run directory (default runs/<recipe name>)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe and print the plan (steps, tokens, "
                   "FLOPs, memory per GPU); train nothing")
    p.add_argument("--gpus", type=int, help="GPU count the plan is made for (default: --nproc, or the ranks here)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU the plan checks against")


def command(args) -> int:
    """Run the parsed command: the plan, training in this process, or (--nproc N) the same command line again as N
    processes under torchrun (`args.entry` = the module and argv that parsed these arguments)."""
    if args.nproc > 1 and not args.dry_run and not under_torchrun():
        return launch(*args.entry, args.nproc)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    gpus = args.gpus or max(args.nproc, world)
    recipe = load_recipe(args.recipe, world_size=gpus if args.dry_run else world, overrides=args.set)
    if args.dry_run:
        print(plan(recipe, gpus=gpus, gpu_memory_gb=args.gpu_memory))
        return 0
    out = args.out or str(Path("runs") / Path(args.recipe).stem)
    return run_job(pretrain, recipe, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m apertus.train", description="Pretrain from a TOML recipe "
                                "(run under torchrun for several processes).")
    add_arguments(p)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.entry = ("apertus.train", argv)
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
