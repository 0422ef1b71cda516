"""Shared pieces of the SFT and alignment tests: a tokenizer for GSM8K text, a small model, recipes as dicts."""

from __future__ import annotations

import json
from pathlib import Path

from apertus.config import data_root

DATE = "2025-09-02"
SYSTEM = "Solve the problem."  # a short system message keeps the rows short (the default one is ~90 tokens)
# 2 layers, 128 wide: a few hundred thousand parameters besides the embeddings
SMALL = {"preset": "tiny", "vocab_size": 4096, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1}


def gsm8k_tokenizer(cache_dir: Path):
    """A 4096-id BPE with the Apertus specials, trained on GSM8K's training text (deterministic, ~2 s, cached)."""
    from apertus.tokenizer import Tokenizer, train_tokenizer

    if (cache_dir / "tokenizer.json").exists():
        return Tokenizer.from_file(cache_dir)
    rows = [json.loads(line) for line in (data_root() / "gsm8k" / "train.jsonl").open()]
    return train_tokenizer([r["question"] + "\n" + r["answer"] for r in rows] + [SYSTEM] * 100, 4096, cache_dir)


def shared_dir(tmp_path_factory) -> Path:
    """A folder shared by every test of the session (the tokenizer and the SFT model are built once)."""
    d = tmp_path_factory.getbasetemp() / "posttrain-shared"
    d.mkdir(exist_ok=True)
    return d


def tokenizer_dir(tmp_path_factory) -> Path:
    d = shared_dir(tmp_path_factory) / "tok"
    gsm8k_tokenizer(d)
    return d


def trained_sft(tmp_path_factory) -> Path:
    """The run folder of a small model fine-tuned on 400 GSM8K conversations for 2 epochs (~70 steps), trained once
    per session (its instruct checkpoint is <run>/hf)."""
    from apertus import cli

    run = shared_dir(tmp_path_factory) / "sft"
    if not (run / "hf" / "model.safetensors").exists():
        recipe = sft_recipe(tokenizer_dir(tmp_path_factory), epochs=2, seq_len=384)
        recipe["data"]["sources"] = [gsm8k("train", 400)]
        assert cli.main(["sft", str(write_recipe(recipe, run.with_suffix(".toml"))), "--out", str(run)]) == 0
    return run


def gsm8k(split: str = "train", limit: int | None = None, skip: int = 0) -> dict:
    src = {"format": "gsm8k", "path": f"gsm8k/{split}.jsonl", "system": SYSTEM, "skip": skip}
    return src | ({"limit": limit} if limit is not None else {})


def sft_recipe(tokenizer: Path, **train) -> dict:
    return {"model": dict(SMALL),
            "data": {"sources": [gsm8k("train", 300)], "tokenizer": str(tokenizer), "date": DATE},
            "train": {"seq_len": 512, "batch_size": 8, "micro_batch": 4, "epochs": 1, "dtype": "fp32",
                      "log_every": 5} | train,
            "optim": {"lr": 3e-3, "betas": [0.9, 0.999, 0.99], "warmup_ratio": 0.05},
            "export": {"dtype": "fp32"}}


def _toml_value(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)  # strings, numbers, booleans: the JSON spelling is valid TOML


def write_recipe(d: dict, path: Path) -> Path:
    """A recipe dict ({section: {key: value}}) as a TOML file."""
    lines = []
    for section, table in d.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return path
