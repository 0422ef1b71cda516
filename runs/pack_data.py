"""Rebuild the compact corpora of data/ from a directory laid out like it (one sub-folder per corpus).

    python runs/pack_data.py SOURCE_DIR [NAME ...]     # writes into data/

For each corpus: NAME/NAME.tar.xz (its files, sorted, with fixed owner, mode and time, xz -9e, so the same files
give the same archive bytes) and NAME/SHA256SUMS (sha256 of every file, `sha256sum -c` format). README.md stays
beside the archive, not in it. What each corpus leaves out is listed in EXCLUDE (see data/README.md for why).
"""

import hashlib
import io
import lzma
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "data"
CORPORA = ["apertus_tokenizer", "dolly_open_qa", "gsm8k", "mgsm", "orca_dpo_pairs", "piqa", "sib200",
           "tinyshakespeare", "udhr", "xcopa", "xwinograd"]
EXCLUDE = {"README.md", "tokenizer.json"}  # tokenizer.json: rebuilt from mistral-common or fetched (17 MB)


def pack(src: Path, name: str) -> None:
    files = sorted(p for p in (src / name).rglob("*") if p.is_file() and p.name not in EXCLUDE)
    out = HERE / name
    out.mkdir(exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in files:
            info = tarfile.TarInfo(str(p.relative_to(src / name)))
            info.size, info.mode, info.mtime = p.stat().st_size, 0o644, 0
            with open(p, "rb") as f:
                tar.addfile(info, f)
    (out / f"{name}.tar.xz").write_bytes(lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(src / name)}\n" for p in files]
    (out / "SHA256SUMS").write_text("".join(lines))
    print(f"{name}: {len(files)} files, {(out / f'{name}.tar.xz').stat().st_size:,} bytes")


if __name__ == "__main__":
    source = Path(sys.argv[1])
    for corpus in sys.argv[2:] or CORPORA:
        pack(source, corpus)
