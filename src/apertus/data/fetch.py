"""`apertus data fetch NAME`: data that is not embedded, downloaded from its canonical public source.

Every file is pinned: a URL at a fixed revision (a git commit, a Hugging Face revision) and the sha256 of the upstream
bytes. Only hashes that are justified are listed: the tokenizer's are the pins of the Swiss AI tokenizer registry
(data/apertus_tokenizer/README.md); the other three are published as the sha256 of these upstream files (same
repository, path and size) by several unrelated public projects, and equal the copies this repository took from the
same sources. Corpora whose upstream bytes could not be established are embedded only and not offered here (the
copy of XCOPA's it/val.it.jsonl in a public code index is 100 characters longer than ours, for one).

Files are downloaded into a temporary folder beside the destination, checked (size, sha256), and only then moved in:
a failed or interrupted fetch leaves nothing half-written. `$APERTUS_DATA_MIRROR` (a base URL serving NAME/PATH)
replaces the upstream hosts, e.g. for a cluster without internet access; `$HF_ENDPOINT` is honoured for the hub.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..embedded import cache_root
from ..util import sha256_file


@dataclass(frozen=True)
class File:
    path: str  # inside the corpus folder
    url: str  # "hf:REPO@REVISION/FILE" or an https URL
    sha256: str
    size: int


@dataclass(frozen=True)
class Corpus:
    about: str
    files: tuple[File, ...]


_GSM8K = "https://raw.githubusercontent.com/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/"
REGISTRY: dict[str, Corpus] = {
    "apertus_tokenizer": Corpus("the released Apertus tokenizer.json (Apache-2.0), swiss-ai/Apertus-8B-Instruct-2509", (
        File("tokenizer.json", "hf:swiss-ai/Apertus-8B-Instruct-2509@b946d40447b2b597999b9c86d44bee0b452c919f/"
             "tokenizer.json", "bb201fb226cde11f66c3cf51c5344fb37b1611f00c21e75c324546d854eff2e1", 17_078_480),)),
    "gsm8k": Corpus("GSM8K train + test (MIT), openai/grade-school-math", (
        File("train.jsonl", _GSM8K + "grade_school_math/data/train.jsonl",
             "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465", 4_166_206),
        File("test.jsonl", _GSM8K + "grade_school_math/data/test.jsonl",
             "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14", 749_738))),
    "hh_rlhf_harmless": Corpus("Anthropic HH-RLHF harmless-base test split (MIT; offensive content), not embedded", (
        File("test.jsonl.gz", "https://raw.githubusercontent.com/anthropics/hh-rlhf/"
             "0398e3636f8d641a03d65b9362aa091297f28564/harmless-base/test.jsonl.gz",
             "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03", 742_801),)),
    "tinyshakespeare": Corpus("tiny Shakespeare (public domain), karpathy/char-rnn", (
        File("input.txt", "https://raw.githubusercontent.com/karpathy/char-rnn/"
             "d1d7aa34fdb3626174bce1d753e6cc6845ce7087/data/tinyshakespeare/input.txt",
             "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1_115_394),)),
}


class FetchError(ValueError):  # ValueError: the CLI prints it as a one-line error
    pass


def url_of(name: str, f: File) -> str:
    """Where a file is downloaded from: the mirror if one is set, the hub endpoint for `hf:` files, else the URL."""
    mirror = os.environ.get("APERTUS_DATA_MIRROR")
    if mirror:
        return f"{mirror.rstrip('/')}/{name}/{f.path}"
    if f.url.startswith("hf:"):
        org, rest = f.url[3:].split("/", 1)
        name_rev, file = rest.split("/", 1)
        repo, rev = name_rev.split("@")
        repo = f"{org}/{repo}"
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        return f"{endpoint}/{repo}/resolve/{rev}/{file}"
    return f.url


def fetch(name: str, to: str | Path | None = None, progress: bool = True) -> Path:
    """Download corpus `name` into `to/name` (default: the user cache that data_root() reads); returns that folder."""
    if name not in REGISTRY:
        raise FetchError(f"no fetchable data set '{name}'; known: {', '.join(sorted(REGISTRY))}")
    dest = Path(to if to is not None else cache_root() / "data") / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".fetch-{name}-", dir=dest.parent))
    try:
        for f in REGISTRY[name].files:
            part = tmp / f.path
            part.parent.mkdir(parents=True, exist_ok=True)
            _download(url_of(name, f), part, f.size, progress)
            digest = sha256_file(part)
            if digest != f.sha256:
                raise FetchError(f"{name}/{f.path}: sha256 {digest} from {url_of(name, f)}, expected {f.sha256}; "
                                 "nothing was written (the source changed or the download is corrupt)")
        for f in REGISTRY[name].files:  # every file checked: only now is anything moved into place
            (dest / f.path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / f.path, dest / f.path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _download(url: str, out: Path, size: int, progress: bool) -> None:
    from tqdm import tqdm

    got = 0
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(out, "wb") as f, \
                tqdm(total=size, unit="B", unit_scale=True, desc=out.name, disable=not progress) as bar:
            while block := r.read(1 << 20):
                f.write(block)
                got += len(block)
                bar.update(len(block))
    except OSError as e:  # URLError, HTTPError, timeouts, and http.client.IncompleteRead on a cut connection
        raise FetchError(f"download of {url} failed after {got:,} bytes: {e}; nothing was written") from e
    if got != size:
        raise FetchError(f"download of {url} gave {got:,} bytes, expected {size:,} (truncated?); nothing was written")


def listing() -> str:
    """The fetchable names and the embedded corpora, one line each."""
    from ..embedded import embedded_corpora

    lines = [f"{n:18s} {sum(f.size for f in c.files) / 1e6:6.1f} MB  {c.about}" for n, c in sorted(REGISTRY.items())]
    lines.append("embedded (unpacked on first use): " + ", ".join(embedded_corpora()))
    return "\n".join(lines)
