"""Tokenized shards: each document is `<s>` + text + `</s>` (docs/recipe.md §1.1), shards are flat little-endian token
files (uint16 when the vocabulary fits, else uint32), and `documents.parquet` indexes every document (source, language,
URL, sha256 of its text, split, shard, token offset, length). The order inside shards is a pure function of the seed
and the documents, so a rebuild gives identical bytes and another seed the same documents in another order.

Layout of a built dataset:
    manifest.json              recipe, versions, tokenizer, shards (+ sha256), stages, funnel, probes summary
    documents.parquet          one row per document, in shard order
    probes.jsonl               memorization probes with their exposure counts (if the recipe has probes)
    shards/<split>/<source>/<k>.bin
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.batching import batched

from ..util import atomic_write

INDEX_COLUMNS = ("id", "source", "kind", "language", "split", "url", "sha256", "shard", "offset", "n_tokens",
                 "n_bytes", "lid_language", "lid_score", "toxicity", "exposure")


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def load_tokenizer(path: str):
    from tokenizers import Tokenizer

    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer {path} not found (a tokenizer.json file)")
    tok = Tokenizer.from_file(str(path))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    if bos is None or eos is None:
        raise ValueError(f"tokenizer {path}: needs <s> and </s> tokens (Apertus ids 1 and 2)")
    return tok, bos, eos


def encode_docs(tok, texts: list[str], bos: int, eos: int, dtype) -> list[np.ndarray]:
    out = []
    for enc in tok.encode_batch_fast(texts, add_special_tokens=False):
        arr = np.empty(len(enc.ids) + 2, dtype=dtype)
        arr[0], arr[-1] = bos, eos
        arr[1:-1] = enc.ids
        out.append(arr)
    return out


class TokenizeParts(PipelineStep):
    """Tokenizes this task's documents into `parts/<rank>.bin` + `<rank>.docs.jsonl` (written, then renamed)."""

    name = "tokenize"
    type = "🔢 - TOKENIZER"

    def __init__(self, tokenizer: str, folder: str, batch_size: int = 512):
        super().__init__()
        self.tokenizer, self.folder, self.batch_size = tokenizer, folder, batch_size

    def run(self, data, rank: int = 0, world_size: int = 1):
        tok, bos, eos = load_tokenizer(self.tokenizer)
        dtype = token_dtype(tok.get_vocab_size())
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        bin_path, docs_path = folder / f"{rank:05d}.bin", folder / f"{rank:05d}.docs.jsonl"
        offset = 0
        with open(f"{bin_path}.tmp", "wb") as fb, open(f"{docs_path}.tmp", "w", encoding="utf-8") as fd:
            for batch in batched(data, self.batch_size):
                for doc, arr in zip(batch, encode_docs(tok, [d.text for d in batch], bos, eos, dtype), strict=True):
                    fb.write(arr.tobytes())
                    m = doc.metadata
                    row = {"id": doc.id, "source": m["source"], "kind": m.get("kind", "web"),
                           "language": m.get("language") or "und", "url": m.get("url"),
                           "sha256": hashlib.sha256(doc.text.encode("utf-8", "surrogatepass")).hexdigest(),
                           "offset": offset, "n_tokens": len(arr), "n_bytes": m.get("n_bytes"),
                           "lid_language": m.get("lid_language"), "lid_score": m.get("lid_score"),
                           "toxicity": m.get("toxicity")}
                    fd.write(json.dumps(row, ensure_ascii=False) + "\n")
                    offset += len(arr)
                    self.stat_update("tokens", value=len(arr))
                    yield doc
        os.replace(f"{bin_path}.tmp", bin_path)
        os.replace(f"{docs_path}.tmp", docs_path)


def order_key(seed: int, doc: dict) -> bytes:
    return hashlib.blake2b(f"{seed}\0{doc['sha256']}\0{doc['id']}".encode(), digest_size=16).digest()


def assign_val(docs: list[dict], fraction: float, min_docs: int) -> None:
    """Held-out documents per language: round(fraction * n), at least 1, for languages with >= min_docs documents;
    chosen by a hash of the text, so the validation set does not move with the seed."""
    by_lang = defaultdict(list)
    for d in docs:
        d["split"] = "train"
        if d["kind"] != "probe":
            by_lang[d["language"]].append(d)
    for group in by_lang.values():
        if fraction <= 0 or len(group) < min_docs:
            continue
        k = max(1, round(fraction * len(group)))
        for d in sorted(group, key=lambda d: order_key(-1, d))[:k]:
            d["split"] = "val"


class _ShardWriter:
    """Appends documents to `shards/<split>/<source>/<k>.bin`, starting a new file past `shard_tokens`; each file is
    written under a temporary name and renamed when complete."""

    def __init__(self, out: Path, split: str, source: str, shard_tokens: int):
        self.out, self.split, self.source, self.limit = out, split, source, shard_tokens
        self.k, self.f, self.records = 0, None, []

    def add(self, tokens: bytes, n_tokens: int) -> tuple[str, int]:
        if self.f is None:
            self.rel = f"shards/{self.split}/{self.source}/{self.k:05d}.bin"
            (self.out / self.rel).parent.mkdir(parents=True, exist_ok=True)
            self.f, self.h, self.n_tok, self.n_doc = open(self.out / (self.rel + ".tmp"), "wb"), hashlib.sha256(), 0, 0
        where = (self.rel, self.n_tok)
        self.f.write(tokens)
        self.h.update(tokens)
        self.n_tok, self.n_doc = self.n_tok + n_tokens, self.n_doc + 1
        if self.n_tok >= self.limit:
            self.close()
        return where

    def close(self):
        if self.f is None:
            return
        self.f.close()
        os.replace(self.out / (self.rel + ".tmp"), self.out / self.rel)
        self.records.append({"path": self.rel, "split": self.split, "source": self.source, "n_tokens": self.n_tok,
                             "n_docs": self.n_doc, "sha256": self.h.hexdigest()})
        self.f, self.k = None, self.k + 1


def write_shards(docs: list[dict], tokens_of, out: Path, seed: int, shard_tokens: int, dtype) -> list[dict]:
    """Writes the shards; fills each doc's `shard`/`offset` (docs are reordered in place); returns shard records."""
    groups = defaultdict(list)
    for d in docs:
        groups[(d["split"], d["source"])].append(d)
    shards, ordered = [], []
    for (split, source), group in sorted(groups.items()):
        group.sort(key=lambda d: order_key(seed, d))
        writer = _ShardWriter(out, split, source, shard_tokens)
        for d in group:
            b = np.ascontiguousarray(tokens_of(d), dtype=dtype).tobytes()
            d["shard"], d["offset"] = writer.add(b, d["n_tokens"])
            ordered.append(d)
        writer.close()
        shards += writer.records
    docs[:] = ordered
    return shards


def write_index(docs: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {c: [d.get(c) for d in docs] for c in INDEX_COLUMNS}
    types = {"offset": pa.int64(), "n_tokens": pa.int64(), "n_bytes": pa.int64(), "lid_score": pa.float64(),
             "toxicity": pa.float64(), "exposure": pa.int64()}
    table = pa.table({c: pa.array(v, type=types.get(c, pa.string())) for c, v in cols.items()})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_index(dataset_dir: str | Path, columns=None):
    """The per-document index of a built dataset as a pyarrow Table (rows in shard order)."""
    import pyarrow.parquet as pq

    return pq.read_table(Path(dataset_dir) / "documents.parquet", columns=columns)

