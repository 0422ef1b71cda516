"""bench/gpu.sh, the GPU benchmark, at --size tiny on CPU (the smoke run): every section runs and the log holds its
numbers, so the script does not rot between the GPU runs. Checks that it runs, not its figures."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def numbers(d: dict, *keys) -> bool:
    return all(isinstance(d.get(k), int | float) and math.isfinite(d[k]) and d[k] >= 0 for k in keys)


@pytest.mark.slow
def test_gpu_bench_smoke_run_writes_every_section(tmp_path):
    env = dict(os.environ, APERTUS_BENCH_RESULTS=str(tmp_path), PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--size", "tiny"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = json.loads((tmp_path / "gpu-tiny-cpu.json").read_text())
    assert log["benchmark"] == "bench/gpu.py" and log["smoke"] is True and log["device"] == "cpu"
    assert log["rows"] == [] and len(log["smoke_rows"]) == 6  # the rows a GPU run would give the README's table
    for name in ("train", "fsdp", "parity", "engine"):
        assert log[name]["status"] == "ok", (name, log[name])
        assert numbers(log[name], "seconds"), name
    for name in ("train", "fsdp"):
        assert numbers(log[name], "tokens_per_s", "mfu", "seconds_per_step", "flops_per_step"), log[name]
        assert len(log[name]["losses"]) == 2
    assert log["fsdp"]["world_size"] == 1 and log["fsdp"]["sharded_parameters"] > 0
    p = log["parity"]
    assert numbers(p, "max_abs_diff", "mean_abs_diff", "argmax_agreement") and p["within_test_tolerance"]
    workloads = {w["workload"]: w for w in log["engine"]["workloads"]}
    assert list(workloads) == ["decode, batch 1", "decode, batch 4", "prefill 256 tokens", "prefill 512 tokens"]
    for w in workloads.values():
        assert numbers(w["tokens_per_s"], "apertus", "peer") and numbers(w, "ratio"), w
    # bench/table.py leaves smoke logs out of the README's table
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "bench" / "table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    assert table.load_logs(tmp_path) == []
