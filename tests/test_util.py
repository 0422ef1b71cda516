"""The shared chores: atomic writes leave the old file whole when the writer fails, hashes match hashlib."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from apertus.util import atomic_write, atomic_write_json, atomic_write_text, hms, read_jsonl, sha256_file


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old\r\n")
    assert target.read_bytes() == b"old\r\n"  # no newline translation

    def failing(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old\r\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary file left behind
    assert atomic_write_text(tmp_path / "new" / "b.txt", "x").read_text() == "x"  # parent folders are created


def test_json_round_trip_and_jsonl_errors_name_the_line(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"ü": [1, 2], "p": tmp_path})
    text = (tmp_path / "x.json").read_text(encoding="utf-8")
    assert "ü" in text and text.endswith("\n") and json.loads(text)["p"] == str(tmp_path)
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n{oops\n')
    rows = read_jsonl(tmp_path / "x.jsonl")
    assert [next(rows), next(rows)] == [{"a": 1}, {"a": 2}]
    with pytest.raises(ValueError, match=r"x\.jsonl:4"):
        next(rows)


def test_sha256_and_durations(tmp_path):
    data = bytes(range(256)) * 5000  # over one 1 MiB block
    (tmp_path / "b").write_bytes(data)
    assert sha256_file(tmp_path / "b") == hashlib.sha256(data).hexdigest()
    assert [hms(0), hms(59.6), hms(382), hms(3 * 3600 + 5)] == ["0:00:00", "0:01:00", "0:06:22", "3:00:05"]


def run_after_import(code: str, variable: str, setting: str | None) -> str:
    """The stdout of `code` in a fresh interpreter, with the environment `variable` unset (None) or set."""
    env = {k: v for k, v in os.environ.items() if k != variable}
    if setting is not None:
        env[variable] = setting
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


THP = "/sys/kernel/mm/transparent_hugepage/enabled"
HUGE_PAGES_USED = """
import apertus, torch
def huge_kb():
    return sum(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages"))
before = huge_kb()
x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
print(huge_kb() - before)
"""


@pytest.mark.skipif(not os.path.exists(THP) or "[never]" in open(THP).read(), reason="no transparent huge pages")
@pytest.mark.parametrize("setting", [None, "0"])
def test_import_apertus_puts_large_tensors_on_huge_pages_unless_told_not_to(setting):
    """`import apertus` (before torch) turns on PyTorch's huge-page allocation of large buffers; THP_MEM_ALLOC_ENABLE=0
    keeps 4 KB pages."""
    huge_kb = int(run_after_import(HUGE_PAGES_USED, "THP_MEM_ALLOC_ENABLE", setting).split()[-1])
    if setting is None:
        assert huge_kb >= 32 * 1024
    elif "[madvise]" in open(THP).read():  # (with [always] the kernel uses huge pages whatever the process asks)
        assert huge_kb < 4 * 1024


FREED_MEMORY_KEPT = """
import apertus, torch
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before = rss_mb()
x = torch.ones(256 * 2**20 // 4)  # 256 MB, touched, then freed
del x
print(rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("setting", [None, "0"])
def test_import_apertus_keeps_freed_buffers_for_the_next_allocation_unless_told_not_to(setting):
    """`import apertus` keeps freed large buffers in the process (no fresh page faults at every training step);
    APERTUS_KEEP_FREED_MEMORY=0 lets glibc return them to the kernel at free."""
    kept_mb = float(run_after_import(FREED_MEMORY_KEPT, "APERTUS_KEEP_FREED_MEMORY", setting))
    if setting is None:
        assert kept_mb >= 200  # the freed 256 MB stay resident, for the next allocation
    else:
        assert kept_mb < 50
