"""bench/table.py: the README's performance table is generated from the benchmark logs, and --check catches a README
that is out of date with them. Tests the generator on synthetic logs, not the figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "bench" / "table.py"
MACHINE = {"cpu": "Test CPU", "isa": "AVX2", "bf16_matrix_units": False, "cores": 2, "gpu": None}
README = """# Project

Intro text.

## Performance

Prose before the table.

<!-- bench-table:start -->
| old | hand | written |
<!-- bench-table:end -->

Prose after the table.
"""


def log(bench: str, rows: list[dict], load=(0.3, 0.5), **extra) -> dict:
    return {"benchmark": f"bench/{bench}.py", "variant": "v", "command": f"python bench/{bench}.py --rounds 1",
            "date": "2026-12-02T01:02:03Z", "load_average_before": [load[0], 1.0, 1.0],
            "load_average_after": [load[1], 1.0, 1.0], "machine": MACHINE, "rows": rows, **extra}


def row(benchmark, apertus, peer="", ratio=""):
    return {"benchmark": benchmark, "apertus": apertus, "peer": peer, "ratio": ratio}


def run(readme: Path, results: Path, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TABLE), "--readme", str(readme), "--results", str(results), *flags],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def setup(tmp_path):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    # alphabetically engine < train, but the table keeps the benchmarks' order: training before inference
    (results / "engine-tiny-fp32.json").write_text(json.dumps(log("engine", [
        row("`bench/engine.py` decode, batch 1", "1,318 tok/s", "transformers `generate` 457 tok/s", "2.89x"),
        row("`bench/engine.py` a | b", "1 / 2 tok/s")], load=(7.25, 10.8))))
    (results / "train-tiny.json").write_text(json.dumps(log("train", [
        row("`bench/train.py` training step", "8,254 tok/s", "transformers + torch AdamW 4,083 tok/s", "2.02x")])))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    return readme, results


def table_lines(text: str) -> list[str]:
    inside = text.split("<!-- bench-table:start -->\n")[1].split("<!-- bench-table:end -->")[0]
    return [line for line in inside.splitlines() if line.startswith("|")]


def test_renders_one_row_per_log_row_with_machine_lines(setup):
    readme, results = setup
    assert run(readme, results, "--check").returncode == 1  # the hand-written table is not the logs'
    done = run(readme, results)
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert table_lines(text) == [
        "| benchmark | apertus | peer | ratio | log |",
        "|---|---|---|---|---|",
        "| `bench/train.py` training step | 8,254 tok/s | transformers + torch AdamW 4,083 tok/s | 2.02x | "
        "train-tiny |",
        "| `bench/engine.py` decode, batch 1 | 1,318 tok/s | transformers `generate` 457 tok/s | 2.89x | "
        "engine-tiny-fp32 |",
        "| `bench/engine.py` a \\| b | 1 / 2 tok/s |  |  | engine-tiny-fp32 |",
    ]
    assert ("- [engine-tiny-fp32](bench/results/engine-tiny-fp32.json): Test CPU, AVX2, no bf16 matrix units, "
            "2 cores, 2026-12-02, load 7.2 → 10.8 (1 min, before → after); `python bench/engine.py --rounds 1`"
            in text)
    assert "| old | hand | written |" not in text
    # the prose around the markers is kept as it was
    assert text.startswith(README.split("<!-- bench-table:start -->")[0])
    assert text.endswith("<!-- bench-table:end -->\n\nProse after the table.\n")
    assert run(readme, results, "--check").returncode == 0
    assert run(readme, results).returncode == 0 and readme.read_text() == text  # idempotent


def test_check_fails_when_a_log_changes_and_writes_nothing(setup):
    readme, results = setup
    assert run(readme, results).returncode == 0
    before = readme.read_text()
    (results / "train-tiny.json").write_text(json.dumps(log("train", [row("`bench/train.py` step", "9,000 tok/s")])))
    check = run(readme, results, "--check")
    assert check.returncode == 1 and "make bench-table" in check.stderr
    assert readme.read_text() == before
    (results / "train-tiny.json").unlink()  # a removed log removes its rows
    assert run(readme, results).returncode == 0
    assert "train-tiny" not in readme.read_text() and len(table_lines(readme.read_text())) == 4


def test_check_fails_on_a_hand_edited_table(setup):
    readme, results = setup
    run(readme, results)
    readme.write_text(readme.read_text().replace("8,254 tok/s", "9,999 tok/s"))
    assert run(readme, results, "--check").returncode == 1


def test_clear_errors_for_missing_markers_and_old_logs(setup):
    readme, results = setup
    readme.write_text("# no markers\n")
    done = run(readme, results)
    assert done.returncode != 0 and "bench-table:start" in done.stderr
    readme.write_text(README)
    (results / "old.json").write_text(json.dumps({"benchmark": "structured", "time": "2026-12-01"}))
    done = run(readme, results)
    assert done.returncode != 0 and "old.json" in done.stderr and "rows" in done.stderr
    (results / "old.json").write_text(json.dumps(log("structured", [{"batch": 1, "free_tok_s": 1.7}])))
    done = run(readme, results)
    assert done.returncode != 0 and "old.json" in done.stderr and "benchmark" in done.stderr
    assert readme.read_text() == README


def test_committed_readme_is_up_to_date_with_committed_logs():
    assert run(ROOT / "README.md", ROOT / "bench" / "results", "--check").returncode == 0
