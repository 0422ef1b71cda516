"""Pretraining on a dataset built by the data pipeline (apertus.data): PackedLoader batches, curriculum stages by
data stage name, per-language validation with bits per byte from the held-out split, the dataset's tokenizer."""

import json

import pytest
import train_data

from apertus.compliance.manifest import verify
from apertus.config import data_root
from apertus.train.distributed import Dist
from apertus.train.pretrain import pretrain
from apertus.train.recipe import parse_recipe


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from apertus.data.pipeline import build
    from apertus.tokenizer import tiny_tokenizer

    tmp = tmp_path_factory.mktemp("ds")
    tok = tiny_tokenizer(tmp / "tok")  # 2,048 ids in the Apertus layout (<s> 1, </s> 2)
    text = (data_root() / "tinyshakespeare" / "input.txt").read_text()
    speeches = [s for s in text.split("\n\n") if len(s) > 200][:400]
    rows = [{"text": s, "language": "eng_Latn"} for s in speeches]
    for lang, key in (("deu_Latn", "deu_1996"), ("fra_Latn", "fra")):
        rows += [{"text": a, "language": lang} for a in train_data.udhr_articles(key)]
    (tmp / "web.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"dataset": {"tokenizer": str(tmp / "tok" / "tokenizer.json"), "val_fraction": 0.1, "val_min_docs": 10},
              "executor": {"tasks": 1, "workers": 1},
              "sources": [{"name": "web", "reader": "jsonl", "path": str(tmp / "web.jsonl")}],
              "stages": [{"name": "first", "tokens": 10_000, "sources": {"web": 1.0}},
                         {"name": "second", "sources": {"web": 1.0}}]}
    build(recipe, tmp / "ds", log=lambda *_: None)
    assert tok.vocab_size == 2048
    return tmp / "ds"


def test_pretraining_on_a_built_dataset_with_stages_and_per_language_validation(dataset, tmp_path):
    table = train_data.tiny_recipe(steps=0)
    table["model"]["vocab_size"] = 2048
    table["data"] = {"dataset": str(dataset)}
    table["eval"] = {"every": 2, "batches": 2, "languages": ["eng_Latn", "deu_Latn", "fra_Latn"],
                     "prompts": ["ROMEO:", "Artikel 1"], "sample_tokens": 5}
    table["schedule"] = {}
    table["stages"] = [{"name": "a", "data": "first", "steps": 2}, {"name": "b", "data": "second", "seed": 5,
                                                                     "steps": 2}]
    result = pretrain(parse_recipe(table), tmp_path / "run", Dist())
    for lang in ("eng_Latn", "deu_Latn", "fra_Latn"):
        assert 6 < result[f"val/{lang}/loss"] < 9 and 0 < result[f"val/{lang}/bpb"] < 10
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000004" / "rank00000.json").read_text())
    loader = state["source"]["loader"]
    assert (loader["stage"], loader["seed"], loader["row"]) == ("second", 5, 2 * 2 * 4)  # 2 steps x 2 micro x 4 rows
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").exists()  # the dataset's tokenizer, for export
    # the [eval] prompts continued at each evaluation (steps 2 and 4), from the weights of that step
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [2, 4]
    assert [x["prompt"] for x in samples[0]["samples"]] == ["ROMEO:", "Artikel 1"]
    assert all(x["text"] and len(x["text"]) < 5 * 30 for r in samples for x in r["samples"])
    # the run's manifest (compliance): the dataset it read, tokens seen, checkpoints hashed and still intact
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["kind"] == "pretrain" and run["tokens"] == result["tokens"] == 4 * 64 * 8
    assert [d["path"] for d in run["datasets"]] == [str(dataset.resolve())] and run["wall_time_s"] > 0
    assert any(p.startswith("checkpoints/step_00000004/") for p in run["artifacts"])
    assert verify(tmp_path / "run")["problems"] == []
    table["model"]["vocab_size"] = 1000
    with pytest.raises(ValueError, match="vocab_size 1,000 is smaller than the vocabulary of the dataset"):
        pretrain(parse_recipe(table), tmp_path / "small", Dist())


def test_unigram_baseline_counts_the_training_documents_of_its_languages(dataset):
    import math

    import numpy as np

    from apertus.data.shards import read_index
    from apertus.eval.unigram import unigram_bpb, unigram_counts

    docs = [d for d in read_index(dataset).to_pylist() if d["split"] == "train" and d["language"] == "deu_Latn"]
    manifest = json.loads((dataset / "manifest.json").read_text())
    expected = np.zeros(2048, np.int64)
    for d in docs:
        ids = np.fromfile(dataset / d["shard"], dtype=manifest["dtype"])[d["offset"]:d["offset"] + d["n_tokens"]]
        np.add.at(expected, ids.astype(np.int64), 1)
    counts = unigram_counts(dataset, ["deu_Latn"])
    assert counts.sum() == sum(d["n_tokens"] for d in docs) and (counts == expected).all()
    assert unigram_counts(dataset).sum() > counts.sum()
    # bits of each token under the add-alpha unigram, over the bytes of the text
    top = int(counts.argmax())
    p = (counts[top] + 0.1) / (counts.sum() + 0.1 * 2048)
    assert math.isclose(unigram_bpb(counts, [[top] * 3], ["abcdef"]), -3 * math.log2(p) / 6)
    with pytest.raises(ValueError, match="no train documents in xxx_Latn"):
        unigram_counts(dataset, ["xxx_Latn"])
