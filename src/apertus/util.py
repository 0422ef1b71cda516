"""The small chores every stage shares: atomic writes, file hashes, JSONL reading, durations.

A file is written under a temporary name in its own folder and renamed over the target (`os.replace` is atomic on
POSIX and Windows), so a reader or a crash never sees half a file. This module imports nothing from apertus.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Calls `write(tmp)` to fill a temporary file beside `path`, then renames it over `path`. For writers that
    take a file name (matplotlib, pyarrow, safetensors); the temporary file is removed if `write` fails. Missing
    parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` as UTF-8, line endings as given (no newline translation)."""
    def write(tmp: Path):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> Path:
    """JSON with a final newline; non-ASCII kept as is, anything else JSON lacks (paths, dates) as its str()."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """The objects of a JSON-lines file, blank lines skipped; a bad line is an error naming file and line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None


def hms(seconds: float) -> str:
    """A duration as H:MM:SS (0:06:22), the format of progress lines and reports."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
