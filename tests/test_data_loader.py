"""PackedLoader against its batch contract: shifted labels, EoD loss mask, position ids restarting after EoD (checked
with apertus.model.packed_position_ids and document_mask), rank slicing independent of world size, exact resume,
determinism per seed, stage weights and the curriculum switch, and the val split."""

import numpy as np
import pytest
import torch
from data_helpers import text_of, tiny_tokenizer, write_jsonl

from apertus.data.loader import PackedLoader, val_documents
from apertus.data.pipeline import build
from apertus.data.shards import read_index
from apertus.model import document_mask, packed_position_ids


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    write_jsonl(tmp / "a.jsonl", [{"text": text_of(i, 20 + 7 * (i % 9)), "language": ["eng_Latn", "deu_Latn"][i % 2]}
                                  for i in range(60)])
    write_jsonl(tmp / "b.jsonl", [{"text": text_of(1000 + i, 40)} for i in range(30)])
    recipe = {"dataset": {"tokenizer": str(tiny_tokenizer(tmp / "tok")), "val_fraction": 0.1, "val_min_docs": 10},
              "executor": {"tasks": 1, "workers": 1},
              "sources": [{"name": "a", "reader": "jsonl", "path": str(tmp / "a.jsonl")},
                          {"name": "b", "reader": "jsonl", "path": str(tmp / "b.jsonl"), "kind": "math",
                           "language": "eng_Latn"}],
              "stages": [{"name": "s1", "tokens": 64 * 8 * 3, "sources": {"a": 1.0}},
                         {"name": "s2", "sources": {"a": 3.0, "b": 1.0}}]}
    build(recipe, tmp / "ds", log=lambda *_: None)
    return tmp / "ds"


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batch_contract(ds):
    b = next(PackedLoader(ds, 64, 4))
    assert set(b) == {"input_ids", "labels", "loss_mask", "position_ids"}
    assert b["input_ids"].shape == (4, 64) and b["input_ids"].dtype == torch.long
    assert b["loss_mask"].dtype == torch.bool and b["position_ids"].dtype == torch.long
    for b in take(PackedLoader(ds, 64, 4, stage="s2"), 5):
        x, y = b["input_ids"], b["labels"]
        assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the next tokens
        assert (y >= 0).all()
        eod = x == 2
        assert torch.equal(b["loss_mask"], ~eod)
        starts = torch.zeros_like(eod)
        starts[:, 1:] = eod[:, :-1]
        assert torch.equal(b["position_ids"], packed_position_ids(starts))
        after = torch.roll(eod, 1, dims=1)
        after[:, 0] = False
        assert (b["position_ids"][after] == 0).all() and (x[after] == 1).all()  # <s> starts each document
        m = document_mask(b["position_ids"])
        for r in range(x.shape[0]):  # the token after an EoD attends to nothing before it; the EoD to its document
            ends = torch.nonzero(eod[r, :-1]).flatten()
            if len(ends):
                p = ends[0].item()
                m = m.reshape(x.shape[0], 64, 64)
                assert not m[r, p + 1, p] and not m[r, p + 1, 0] and m[r, p, 0]


def test_rows_tile_the_stream(ds):
    """Consecutive rows of a source share one boundary token: row k = stream[kT : kT+T+1]."""
    loader = PackedLoader(ds, 32, 1, stage="s1")
    rows = [torch.cat([b["input_ids"][0], b["labels"][0, -1:]]) for b in take(loader, 30)]
    for r0, r1 in zip(rows, rows[1:], strict=False):
        assert r0[-1] == r1[0]
    stream = torch.cat([rows[0]] + [r[1:] for r in rows[1:]]).numpy()
    index = [d for d in read_index(ds).to_pylist() if d["split"] == "train" and d["source"] == "a"]
    assert stream[0] == 1 and (stream == 1).sum() >= 10
    docs = np.split(stream, np.nonzero(stream == 2)[0] + 1)[:-1]
    assert {d.shape[0] for d in docs} <= {d["n_tokens"] for d in index}  # whole documents, never cut inside


def test_ranks_partition_the_global_batch(ds):
    one = take(PackedLoader(ds, 48, 4, stage="s2", seed=3), 3)
    r0 = take(PackedLoader(ds, 48, 2, stage="s2", seed=3, rank=0, world_size=2), 3)
    r1 = take(PackedLoader(ds, 48, 2, stage="s2", seed=3, rank=1, world_size=2), 3)
    for full, a, b in zip(one, r0, r1, strict=True):
        assert torch.equal(full["input_ids"][0::2], a["input_ids"])
        assert torch.equal(full["input_ids"][1::2], b["input_ids"])
    with pytest.raises(ValueError):
        PackedLoader(ds, 48, 2, rank=2, world_size=2)


def test_exact_resume_and_seeds(ds):
    ref = PackedLoader(ds, 40, 3, seed=7)
    take(ref, 5)
    state = ref.state_dict()
    expect = take(ref, 6)
    fresh = PackedLoader(ds, 40, 3, seed=7)
    fresh.load_state_dict(__import__("json").loads(__import__("json").dumps(state)))
    for a, b in zip(expect, take(fresh, 6), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    same = take(PackedLoader(ds, 40, 3, seed=7), 3)
    other = take(PackedLoader(ds, 40, 3, seed=8), 3)
    again = take(PackedLoader(ds, 40, 3, seed=7), 3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(same, again, strict=True))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(same, other, strict=True))
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(ds, 40, 3, seed=1).load_state_dict(state)


def test_stage_weights_and_curriculum(ds):
    loader = PackedLoader(ds, 64, 8, stage="s2")
    take(loader, 10)
    counts = dict(zip(loader.state_dict()["sources"], loader.state_dict()["counts"], strict=True))
    assert counts == {"a": 60, "b": 20}  # 3:1, exact at every prefix
    cur = PackedLoader(ds, 64, 8)
    names = []
    for _ in range(5):
        next(cur)
        names.append(cur.stage)
    assert names == ["s1", "s1", "s1", "s2", "s2"]  # s1 has a budget of 3 global batches of 64x8 tokens
    with pytest.raises(ValueError, match="stage"):
        PackedLoader(ds, 64, 8, stage="nope")


def test_val_split_held_out(ds):
    index = read_index(ds).to_pylist()
    val = [d for d in index if d["split"] == "val"]
    assert {d["language"] for d in val} == {"eng_Latn", "deu_Latn"}
    assert not {d["sha256"] for d in val} & {d["sha256"] for d in index if d["split"] == "train"}
    docs = list(val_documents(ds, "deu_Latn"))
    assert docs and all(d["tokens"][0] == 1 and d["tokens"][-1] == 2 and d["n_bytes"] > 0 for d in docs)
    b = next(PackedLoader(ds, 16, 2, split="val", stage="s1"))
    assert b["input_ids"].shape == (2, 16)


def test_stage_languages_keep_only_those_documents(ds, tmp_path):
    import json
    import shutil

    d = tmp_path / "ds"
    shutil.copytree(ds, d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["stages"] = [{"name": "de", "sources": {"a": 1.0, "b": 1.0}, "tokens": None, "languages": ["deu_Latn"]}]
    (d / "manifest.json").write_text(json.dumps(manifest))
    loader = PackedLoader(d, 64, 4)
    assert loader.sources == ["a"]  # b is English only: nothing of it is left in the stage
    german = [x for x in read_index(d).to_pylist() if x["split"] == "train" and x["language"] == "deu_Latn"]
    shard, offset, n_tokens, total = loader.docs["a"]
    assert total == sum(x["n_tokens"] for x in german) < sum(
        x["n_tokens"] for x in read_index(d).to_pylist() if x["split"] == "train" and x["source"] == "a")
    assert sorted(offset.tolist()) == sorted(x["offset"] for x in german)
    take(loader, 3)
    manifest["stages"][0]["languages"] = ["fra_Latn"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="no train documents"):
        PackedLoader(d, 64, 4)
