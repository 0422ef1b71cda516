"""Fixtures of the compliance tests: a small built dataset whose web documents carry URLs on several hosts (and
robots.txt snapshots for some of them), a second source without URLs, two curriculum stages and shards small enough
that a removal touches only some of them."""

import json
from pathlib import Path

from data_helpers import text_of, tiny_tokenizer, write_jsonl

ROBOTS = {
    "gpt.example": "User-agent: GPTBot\nDisallow: /\n",  # everything, for one AI agent
    "star.example": "User-agent: *\nDisallow: /private/\n",  # one path, for every agent
    "allow.example": "User-agent: *\nAllow: /\n",
}
HOSTS = ["gpt.example", "star.example", "allow.example", "news.example", "blog.news.example", "shop.example"]


def corpus(root: Path) -> Path:
    web = []
    for i in range(48):
        host = HOSTS[i % len(HOSTS)]
        path = "private" if i % 4 == 1 else "public"
        web.append({"id": f"w{i}", "text": text_of(i), "url": f"https://{host}/{path}/{i}", "language": "eng_Latn"})
    web[3]["text"] += " Mail me at someone@example.org."
    write_jsonl(root / "web" / "data" / "web.jsonl", web)
    write_jsonl(root / "books" / "data" / "books.jsonl",
                [{"id": f"b{i}", "text": text_of(1000 + i, 200), "language": "eng_Latn"} for i in range(16)])
    (root / "web" / "README.md").write_text("# web\n\n**License:** CC BY 4.0 (the fixture's own text).\n")
    (root / "books" / "README.md").write_text("# books\n\n**License:** public domain.\n")
    (root / "robots").mkdir(exist_ok=True)
    for host, text in ROBOTS.items():
        (root / "robots" / f"{host}.txt").write_text(text)
    return root


def recipe(root: Path) -> dict:
    return {
        "name": "compliance-fixture",
        "dataset": {"tokenizer": str(tiny_tokenizer(root / "tok")), "seed": 0, "shard_tokens": 1500,
                    "val_fraction": 0.1, "val_min_docs": 5},
        "executor": {"tasks": 1, "workers": 1},
        "sources": [{"name": "web", "reader": "jsonl", "path": str(root / "web" / "data"), "kind": "web"},
                    {"name": "books", "reader": "jsonl", "path": str(root / "books" / "data"), "kind": "web"}],
        "steps": {"pii": {}},
        "stages": [{"name": "web-first", "tokens": 4000, "sources": {"web": 1.0}},
                   {"name": "mix", "sources": {"web": 0.5, "books": 0.5}}],
    }


def build_dataset(root: Path) -> Path:
    from apertus.data.pipeline import build

    corpus(root)
    out = root / "data"
    build(recipe(root), out, log=lambda *a: None)
    return out


def shard_tokens(dataset: Path) -> dict[str, "object"]:
    import numpy as np

    man = json.loads((dataset / "manifest.json").read_text())
    return {s["path"]: np.fromfile(dataset / s["path"], dtype=man["dtype"]) for s in man["shards"]}
