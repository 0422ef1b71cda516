"""The corpora that travel with the project, and where every reader finds its data.

The repository's `data/` folder holds one sub-folder per corpus: `NAME.tar.xz` (the files, byte-identical to what was
taken from the source named in its README), `SHA256SUMS` (sha256 of every file inside, `sha256sum -c` format) and
`README.md` (source, revision, licence, attribution). A wheel carries the same folder as `apertus/corpora/`.

Readers read plain files, so on first use each archive is unpacked into the user cache
(`$XDG_CACHE_HOME/apertus/data` or `~/.cache/apertus/data`), every file checked against SHA256SUMS before it is moved
into place; `apertus data fetch NAME` writes into the same folder. `$APERTUS_DATA` overrides all of this.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from .util import sha256_file

SUMS = "SHA256SUMS"
MARKER = ".embedded"  # in an unpacked corpus: the sha256 of the SHA256SUMS it was unpacked from
_checked: set[tuple[str, str]] = set()  # (folder, stamp) verified complete in this process


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/apertus`, else `~/.cache/apertus` (where the rebuilt tokenizer is cached too)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "apertus"


def packaged_dir(name: str, in_repo: str) -> Path:
    """A folder kept at the repository root (`data/`, `recipes/`) that a wheel carries inside the package
    (`apertus/corpora`, `apertus/recipes`; setup.py maps them): the package's copy if installed, else the checkout's
    (a source checkout, an editable install)."""
    package = Path(__file__).resolve().parent
    return package / name if (package / name).is_dir() else package.parents[1] / in_repo


def embedded_dir() -> Path | None:
    """The compact corpora (`data/` of the repository), or None if this installation carries none."""
    d = packaged_dir("corpora", "data")
    return d if any(d.glob(f"*/{SUMS}")) else None


def read_sums(path: Path) -> dict[str, str]:
    """relative path -> sha256 from a `sha256sum` file ("<hex>  <path>" per line)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            out[name.lstrip("*")] = digest
    return out


def embedded_corpora() -> dict[str, Path]:
    """name -> its folder under `data/`, for the corpora whose files are embedded (an archive beside SHA256SUMS)."""
    src = embedded_dir()
    if src is None:
        return {}
    return {d.name: d for d in sorted(src.iterdir()) if (d / f"{d.name}.tar.xz").is_file() and (d / SUMS).is_file()}


def data_root() -> Path:
    """Where readers find corpora: `$APERTUS_DATA`, else the user cache with the embedded corpora unpacked in it."""
    if os.environ.get("APERTUS_DATA"):
        return Path(os.environ["APERTUS_DATA"])
    root = cache_root() / "data"
    for name, src in embedded_corpora().items():
        unpack(src, root / name)
    return root


def unpack(src: Path, dest: Path) -> Path:
    """Unpack `src/NAME.tar.xz` into `dest` unless an unpacked copy of the same SHA256SUMS is complete there.
    Files are extracted into a temporary folder beside `dest`, checked, then moved in; files that `apertus data
    fetch` added to `dest` stay."""
    sums_bytes = (src / SUMS).read_bytes()
    stamp = hashlib.sha256(sums_bytes).hexdigest()
    if (str(dest), stamp) in _checked:
        return dest
    sums = read_sums(src / SUMS)
    marker = dest / MARKER
    if marker.is_file() and marker.read_text().strip() == stamp and all((dest / p).is_file() for p in sums):
        _checked.add((str(dest), stamp))
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        with tarfile.open(src / f"{src.name}.tar.xz", "r:xz") as tar:
            # the "data" filter (Python >= 3.10.12) refuses links and paths outside tmp
            tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        got = {str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()}
        if got != set(sums):
            raise ValueError(f"{src}: the archive holds {sorted(got ^ set(sums))[:5]} that SHA256SUMS does not "
                             "list (or misses them): the embedded data is damaged; reinstall or re-clone")
        for rel, digest in sums.items():
            if sha256_file(tmp / rel) != digest:
                raise ValueError(f"{src / src.name}.tar.xz: {rel} does not match its sha256 in {SUMS}: the embedded "
                                 "data is damaged; reinstall or re-clone")
        for rel in sums:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, dest / rel)
        if (src / "README.md").is_file():
            shutil.copyfile(src / "README.md", tmp / "README.md")
            os.replace(tmp / "README.md", dest / "README.md")
        (tmp / MARKER).write_text(stamp + "\n")
        os.replace(tmp / MARKER, marker)  # last: a folder without the marker is unpacked again
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _checked.add((str(dest), stamp))
    return dest


def corpus_path(name: str, *parts: str) -> Path:
    """`data_root()/name/parts…`, or a one-line FileNotFoundError naming the corpus and the command that gets it."""
    path = data_root().joinpath(name, *parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: corpus '{name}' is not embedded in this package or not complete "
                                f"there; run `apertus data fetch {name}` (or set APERTUS_DATA to a folder holding it)")
    return path
