"""Dedup through the real build (datatrove exact + MinHash phases, two tasks so duplicates cross task boundaries):
exact copies and a near copy are removed, distinct documents are all kept."""

from data_helpers import text_of, tiny_tokenizer, write_jsonl

from apertus.data.pipeline import build
from apertus.data.shards import read_index


def test_exact_and_near_duplicates(tmp_path):
    a, b = text_of(1, 300), text_of(2, 300)
    words = b.split()
    words[50], words[150] = "changed", "edited"  # two words of 300: Jaccard of 5-gram shingles ~0.94
    near_b = " ".join(words)
    distinct = {f"d{i}": text_of(100 + i, 300) for i in range(6)}
    write_jsonl(tmp_path / "in/0.jsonl", [{"id": "a1", "text": a}, {"id": "b", "text": b},
                                         *({"id": k, "text": v} for k, v in list(distinct.items())[:3])])
    write_jsonl(tmp_path / "in/1.jsonl", [{"id": "a2", "text": a}, {"id": "b_near", "text": near_b},
                                         {"id": "a3", "text": a},
                                         *({"id": k, "text": v} for k, v in list(distinct.items())[3:])])
    recipe = {"dataset": {"tokenizer": str(tiny_tokenizer(tmp_path / "tok")), "val_fraction": 0},
              "executor": {"tasks": 2, "workers": 1},
              "sources": [{"name": "web", "reader": "jsonl", "path": str(tmp_path / "in"), "language": "eng_Latn"}],
              "steps": {"dedup": {"exact": True, "minhash": True}}}
    m = build(recipe, tmp_path / "out", log=lambda *_: None)
    ids = sorted(x.split("/", 1)[1] for x in read_index(tmp_path / "out")["id"].to_pylist())
    kept_a = [i for i in ids if i.startswith("a")]
    kept_b = [i for i in ids if i.startswith("b")]
    assert len(kept_a) == 1 and len(kept_b) == 1
    assert set(distinct) <= set(ids) and len(ids) == len(distinct) + 2
    events = m["funnel"]["by_source"]["web"]
    assert events["dedup_exact:duplicate"]["docs"] == 2
    assert events["dedup_minhash:near_duplicate"]["docs"] == 1
    assert events["in"]["docs"] == 11 and events["out:train"]["docs"] == 8
