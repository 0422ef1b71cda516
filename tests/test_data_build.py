"""The build end to end on small fixtures: bad input is counted and skipped, determinism (same seed -> identical
shard hashes; another seed -> same documents, another order), resume after an interruption, opt-out and probes in
the manifest, and the embedded default recipe (>= 200 languages) through the CLI."""

import gzip
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import text_of, tiny_tokenizer, write_jsonl

from apertus.data import shards as shards_mod
from apertus.data.pipeline import build, load_recipe
from apertus.data.shards import read_index
from apertus.util import sha256_file

ROBOTS = {"gpt.example": "User-agent: GPTBot\nDisallow: /\n", "star.example": "User-agent: *\nDisallow: /private/\n"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    good = [{"id": f"g{i}", "text": text_of(i), "url": f"https://ok{i % 3}.example/p{i}"} for i in range(24)]
    good[0]["text"] += " Write to alice@example.org or 8.8.8.8."
    good += [{"id": "gpt", "text": text_of(90), "url": "https://gpt.example/x"},
             {"id": "priv", "text": text_of(91), "url": "https://star.example/private/y"},
             {"id": "pub", "text": text_of(92), "url": "https://star.example/public/z"}]
    write_jsonl(root / "web/good.jsonl", good)
    write_jsonl(root / "web/bad.jsonl", [
        b"{not json\n", b'["a list"]\n', b'{"text": "caf\xe9 latin-1"}\n', {"id": "nofield", "body": "x"},
        {"id": "empty", "text": "   "}, {"id": "huge", "text": "word " * 5000}, {"id": "ok", "text": text_of(200)}])
    (root / "web/broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n')[:20])  # truncated gzip
    pq.write_table(pa.table({"content": [text_of(300 + i) for i in range(6)], "id": [f"p{i}" for i in range(6)]}),
                   root / "pq.parquet")
    (root / "txt").mkdir()
    (root / "txt/a.txt").write_text(text_of(400, 400))
    (root / "txt/b.txt").write_bytes(b"\xff\xfe broken utf-8")
    (root / "probes.txt").write_text("\n".join(text_of(500 + i, 30) for i in range(60)))
    (root / "robots").mkdir()
    for host, text in ROBOTS.items():
        (root / "robots" / f"{host}.txt").write_text(text)
    return root


def recipe(corpus, tmp, seed=0, tasks=2):
    return {
        "name": "fixture",
        "dataset": {"tokenizer": str(tiny_tokenizer(tmp / "tok")), "seed": seed, "shard_tokens": 2000,
                    "val_fraction": 0.1, "val_min_docs": 5, "max_chars": 20_000},
        "executor": {"tasks": tasks, "workers": 1},
        "sources": [
            {"name": "web", "reader": "jsonl", "path": str(corpus / "web"), "language": "eng_Latn"},
            {"name": "pq", "reader": "parquet", "path": str(corpus / "pq.parquet"), "text": "content",
             "kind": "math"},
            {"name": "txt", "reader": "text", "path": str(corpus / "txt"), "glob": "*.txt", "kind": "code",
             "language": "code"}],
        "steps": {"langid": {}, "pii": {}, "optout": {"robots": str(corpus / "robots")},
                  "quality": {"gopher_repetition": {}}, "toxicity": {"min_docs": 5},
                  "dedup": {"exact": True, "minhash": True}},
        "probes": {"text": str(corpus / "probes.txt"), "into": "web", "exposures": [1, 4], "per_exposure": 2,
                   "controls": 3, "chars": 150},
        "stages": [{"name": "one", "tokens": 5000, "sources": {"web": 1.0}},
                   {"name": "two", "sources": {"web": 1.0, "pq": 0.5, "txt": 0.2}}],
    }


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("b")
    return build(recipe(corpus, tmp), tmp / "a", log=lambda *_: None), tmp


def test_bad_input_counted_and_skipped(built):
    m, _ = built
    web = m["funnel"]["by_source"]["web"]
    assert web["input:malformed_json"]["docs"] == 2
    assert web["input:invalid_utf8"]["docs"] == 1
    assert web["input:missing_field"]["docs"] == 1
    assert web["input:unreadable_file"]["docs"] == 1
    assert web["input:empty"]["docs"] == 1 and web["input:too_long"]["docs"] == 1
    assert m["funnel"]["by_source"]["txt"]["input:invalid_utf8"]["docs"] == 1
    assert web["in"]["docs"] == 27 + 3  # good + empty + huge + ok


def test_optout_pii_and_funnel_balance(built):
    m, tmp = built
    ids = set(read_index(tmp / "a")["id"].to_pylist())
    assert "web/gpt" not in ids and "web/priv" not in ids and "web/pub" in ids
    web = m["funnel"]["by_source"]["web"]
    assert web["optout:robots_disallowed"]["docs"] == 2
    assert web["pii:email"]["items"] == 1 and web["pii:ip"]["items"] == 1
    for source, events in m["funnel"]["by_source"].items():  # every document that came in is accounted for
        out = sum(v["docs"] for e, v in events.items() if e.startswith("out:"))
        dropped = sum(v["docs"] for e, v in events.items() if ":" in e and not e.startswith(("out:", "pii:", "input:")))
        assert events["in"]["docs"] == out + dropped + sum(
            v["docs"] for e, v in events.items() if e in ("input:empty", "input:too_long")), source


def test_shards_index_and_manifest(built):
    m, tmp = built
    out = tmp / "a"
    assert m["dtype"] == "uint16" and m["tokenizer"]["bos_id"] == 1 and m["tokenizer"]["eos_id"] == 2
    index = read_index(out).to_pylist()
    for s in m["shards"]:
        assert sha256_file(out / s["path"]) == s["sha256"]
    for d in index[:40]:
        toks = np.fromfile(out / d["shard"], dtype=np.uint16)[d["offset"]: d["offset"] + d["n_tokens"]]
        assert toks[0] == 1 and toks[-1] == 2 and 2 not in toks[1:-1]
    assert {"train", "val"} == {d["split"] for d in index}
    train = {d["sha256"] for d in index if d["split"] == "train"}
    assert not train & {d["sha256"] for d in index if d["split"] == "val" and d["kind"] != "probe"}
    probes = [json.loads(x) for x in (out / "probes.jsonl").read_text().splitlines()]
    assert Counter(p["exposure"] for p in probes) == {1: 2, 4: 2, 0: 3}
    in_index = Counter(d["sha256"] for d in index if d["kind"] == "probe")
    for p in probes:  # exposed probes appear exactly `exposure` times, controls never
        assert in_index.get(p["sha256"], 0) == p["exposure"]
    assert [s["name"] for s in m["stages"]] == ["one", "two"]
    assert m["versions"]["datatrove"] and m["recipe"]["name"] == "fixture"


def test_deterministic_and_seeded(built, corpus, tmp_path):
    m, _ = built
    again = build(recipe(corpus, tmp_path), tmp_path / "again", log=lambda *_: None)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in m["shards"]]
    other = build(recipe(corpus, tmp_path, seed=1), tmp_path / "seed1", log=lambda *_: None)
    assert [s["sha256"] for s in other["shards"]] != [s["sha256"] for s in m["shards"]]
    a = read_index(tmp_path / "again").to_pylist()
    b = read_index(tmp_path / "seed1").to_pylist()
    assert sorted((d["sha256"], d["split"]) for d in a) == sorted((d["sha256"], d["split"]) for d in b)
    assert [d["id"] for d in a] != [d["id"] for d in b]


def test_resume_after_interruption(corpus, tmp_path, monkeypatch, built):
    m, _ = built
    real = shards_mod.TokenizeParts.run

    def dies_on_rank_1(self, data, rank=0, world_size=1):
        if rank == 1:
            raise KeyboardInterrupt("killed")
        yield from real(self, data, rank, world_size)

    monkeypatch.setattr(shards_mod.TokenizeParts, "run", dies_on_rank_1)
    with pytest.raises(KeyboardInterrupt):
        build(recipe(corpus, tmp_path), tmp_path / "r", log=lambda *_: None)
    work = tmp_path / "r" / "work"
    assert (work / "logs/tokenize/completions/00000").exists()
    assert not (work / "logs/tokenize/completions/00001").exists() and not (tmp_path / "r/manifest.json").exists()
    stamp = (work / "logs/filter/completions/00000").stat().st_mtime_ns
    part0 = (work / "parts/00000.bin").stat().st_mtime_ns
    monkeypatch.setattr(shards_mod.TokenizeParts, "run", real)
    done = build(recipe(corpus, tmp_path), tmp_path / "r", log=lambda *_: None, keep_work=True)
    assert (work / "logs/filter/completions/00000").stat().st_mtime_ns == stamp  # finished work not redone
    assert (work / "parts/00000.bin").stat().st_mtime_ns == part0
    assert [s["sha256"] for s in done["shards"]] == [s["sha256"] for s in m["shards"]]  # nothing duplicated


def test_recipe_errors(corpus, tmp_path):
    r = recipe(corpus, tmp_path)
    r["sources"][0]["path"] = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="missing"):
        build(r, tmp_path / "x")
    r = recipe(corpus, tmp_path)
    r["stages"][0]["sources"] = {"nope": 1.0}
    with pytest.raises(ValueError, match="unknown source"):
        load_recipe(r)
    r = recipe(corpus, tmp_path)
    r["stages"][0]["languages"] = "deu_Latn"
    with pytest.raises(ValueError, match="languages must be a non-empty list"):
        load_recipe(r)
    r = recipe(corpus, tmp_path)
    r["steps"]["typo"] = {}
    with pytest.raises(ValueError, match="typo"):
        load_recipe(r)
    build(recipe(corpus, tmp_path), tmp_path / "y", log=lambda *_: None)
    with pytest.raises(ValueError, match="different recipe"):
        build(recipe(corpus, tmp_path, seed=5), tmp_path / "y")


@pytest.mark.slow
def test_default_recipe_builds_200_languages(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "tiny"
    res = subprocess.run([sys.executable, "-m", "apertus.cli", "data", "build", str(root / "recipes/data_tiny.toml"),
                          "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout)
    assert "languages in the training split" in res.stdout and "out:train" in res.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["languages"] >= 200
    flores_langs = {d["language"] for d in read_index(out, ["source", "language", "split"]).to_pylist()
                    if d["source"] == "flores"}
    assert len(flores_langs) >= 200
    assert m["probes"]["n"] == 32 and [s["name"] for s in m["stages"]] == ["multilingual", "code-math"]
