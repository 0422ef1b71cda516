"""run.json and `apertus verify`: a flipped byte in a shard, the index or a checkpoint is caught (directly and through
a training run that read the dataset); the manifest records code, packages, hardware, seeds and an energy estimate
that is labelled as one; a training-loop folder is recorded after the fact."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from compliance_helpers import build_dataset

from apertus.checkpoint import save_model
from apertus.compliance.manifest import (
    energy_estimate,
    record,
    record_data_build,
    verify,
    write_run_manifest,
)
from apertus.config import preset
from apertus.model import build_model


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = build_dataset(tmp_path_factory.mktemp("manifest"))
    record_data_build(d, wall_time=12.5)
    return d


def _flip(path, at=100):
    data = bytearray(path.read_bytes())
    data[min(at, len(data) - 1)] ^= 0x01
    path.write_bytes(bytes(data))


def _verify_cli(path):
    return subprocess.run([sys.executable, "-m", "apertus.cli", "verify", str(path)], capture_output=True, text=True)


def test_data_run_json_and_flipped_shard(dataset, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(dataset, d)
    run = json.loads((d / "run.json").read_text())
    man = json.loads((d / "manifest.json").read_text())
    assert run["kind"] == "data" and run["config"] == man["recipe"] and run["seeds"]["order"] == 0
    assert run["tokens"] == sum(s["n_tokens"] for s in man["shards"])
    assert {s["path"] for s in man["shards"]} | {"manifest.json", "documents.parquet"} == set(run["artifacts"])
    assert run["packages"]["torch"] == torch.__version__ and run["hardware"]["cpu_count"] >= 1
    assert run["code"]["git_commit"] and len(run["code"]["git_commit"]) == 40  # tests run from a git checkout
    assert run["energy"]["estimate"] is True and "ESTIMATE" in run["energy"]["method"]
    assert run["energy"]["kwh"] == pytest.approx(run["energy"]["device_power_w"] * 12.5 / 3600 / 1000)
    r = _verify_cli(d)
    assert r.returncode == 0 and "all hashes match" in r.stdout
    shard = d / man["shards"][2]["path"]
    _flip(shard)
    r = _verify_cli(d)
    assert r.returncode == 1 and man["shards"][2]["path"] in r.stdout
    assert [p["path"] for p in verify(d)["problems"]] == [str(shard)]
    _flip(shard)  # flipped back: clean again
    _flip(d / "documents.parquet", at=50)
    assert [p["path"] for p in verify(d)["problems"]] == [str(d / "documents.parquet")]


def test_dataset_without_run_json_is_checked_against_its_manifest(dataset, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(dataset, d)
    (d / "run.json").unlink()
    assert verify(d)["problems"] == []
    man = json.loads((d / "manifest.json").read_text())
    _flip(d / man["shards"][0]["path"], at=7)
    assert len(verify(d)["problems"]) == 1


def test_training_run_catches_checkpoint_and_dataset_changes(dataset, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(dataset, d)
    run = tmp_path / "run"
    model = build_model(preset("tiny"), seed=0)
    save_model(model, run / "hf")
    m = write_run_manifest(run, "pretrain", {"model": "tiny"}, {"train": 0}, ["hf"], tokens=1000, flops=6e9,
                           wall_time=3.0, datasets=[d], parents=[d], metrics={"parameters": model.num_params()})
    assert set(m["artifacts"]) == {"hf/model.safetensors", "hf/config.json", "hf/generation_config.json"}
    assert m["datasets"][0]["shards"] == len(json.loads((d / "manifest.json").read_text())["shards"])
    assert verify(run)["problems"] == []
    _flip(run / "hf" / "model.safetensors", at=5000)
    probs = verify(run)["problems"]
    assert [p["path"] for p in probs] == [str(run / "hf" / "model.safetensors")]
    _flip(run / "hf" / "model.safetensors", at=5000)
    shard = d / json.loads((d / "manifest.json").read_text())["shards"][0]["path"]
    _flip(shard)  # the dataset the run read changed: caught from the run folder too
    assert str(shard) in {p["path"] for p in verify(run)["problems"]}
    (run / "hf" / "config.json").unlink()
    assert any(p["problem"] == "missing" for p in verify(run)["problems"])


def test_record_training_loop_folder(tmp_path):
    """The layout the training loop leaves (recipe.json, metrics.jsonl, checkpoints/step_*/ with config.json)."""
    run = tmp_path / "pretrain"
    cfg = preset("tiny")
    ck = run / "checkpoints" / "step_00000004"
    save_model(build_model(cfg, seed=0), ck)
    (ck / "state.json").write_text(json.dumps({"step": 4, "tokens": 4096}))
    recipe = {"model": {}, "data": {"dataset": None}, "train": {"seq_len": 128, "seed": 7, "goldfish_k": 50,
                                                                "goldfish_h": 50},
              "stages": [{"name": "s0", "start_step": 0, "steps": 2, "seq_len": 128, "seed": None},
                         {"name": "s1", "start_step": 2, "steps": 2, "seq_len": 256, "seed": 3}]}
    (run / "recipe.json").write_text(json.dumps(recipe))
    rows = [{"step": s, "tokens": 1024 * s, "loss": 5.0 - s, "time": 100.0 + 2 * s} for s in range(1, 5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = record(run)
    assert m["kind"] == "pretrain" and m["tokens"] == 4096 and m["seeds"] == {"train": 7, "stages": [None, 3]}
    assert m["flops"] == pytest.approx(2048 * cfg.flops_per_token(128) + 2048 * cfg.flops_per_token(256))
    assert m["wall_time_s"] == pytest.approx(8.0)  # 6 s between the first and last log line, + one mean step
    assert "checkpoints/step_00000004/model.safetensors" in m["artifacts"]
    assert verify(run)["problems"] == []


def test_energy_estimate_and_errors(tmp_path):
    gpu = energy_estimate(3600, hw={"accelerators": ["NVIDIA GH200 480GB"] * 4})
    assert gpu["kwh"] == pytest.approx(0.56 * 4) and gpu["devices"] == 4
    assert energy_estimate(None) is None
    with pytest.raises(FileNotFoundError):
        verify(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    assert _verify_cli(tmp_path / "empty").returncode == 2
    with pytest.raises(ValueError, match="neither a built dataset"):
        record(tmp_path / "empty")
