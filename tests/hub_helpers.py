"""A Hugging Face hub cache laid out on disk as huggingface_hub writes it, for tests that run with HF_HUB_OFFLINE=1.

    HF_HUB_CACHE/models--org--name/
        blobs/<etag>                 file contents; the etag is the sha256 for LFS files (weights), git's blob sha1
                                     for the others (what the hub returns as ETag and hf_hub_download names blobs by)
        snapshots/<commit>/<file>    relative symlinks into ../../blobs
        refs/<branch>                the commit a branch points to

Names and hashes come from huggingface_hub itself (repo_folder_name, git_hash, sha_fileobj); the tests then check
the layout with huggingface_hub's own reader (scan_cache_dir) before relying on it.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path

from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils.sha import git_hash, sha_fileobj

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")


def add_to_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str | None = None,
                     branch: str | None = "main") -> str:
    """Put the files of `folder` into `cache` as revision `commit` of model `repo_id` (and point `branch` at it);
    returns the commit hash."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    if commit is None:  # a stable 40-hex id of the content, as a commit hash would be
        h = hashlib.sha1(repo_id.encode())
        for f in files:
            h.update(f.name.encode() + f.read_bytes())
        commit = h.hexdigest()
    repo = Path(cache) / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in files:
        data = f.read_bytes()
        etag = sha_fileobj(io.BytesIO(data)).hex() if f.name.endswith(LFS_SUFFIXES) else git_hash(data)
        blob = repo / "blobs" / etag
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = snapshot / f.name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(blob, snapshot), link)
    if branch:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    return commit


def offline_env(cache: Path, **extra) -> dict[str, str]:
    """The environment of a subprocess that reads the hub cache `cache` and never the network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return {**env, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(Path(cache).parent / "hf-home"),
            **extra}
