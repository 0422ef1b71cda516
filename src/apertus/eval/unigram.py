"""The trivial baseline a language model has to beat: a unigram model of its own tokenizer, fitted on the tokens it
was trained on. Bits per byte of a context-free token distribution is what counting alone reaches; a model that sits
at it has learned token frequencies and nothing about context. (A uniform distribution over the vocabulary, the
"chance" of `bpb_metrics`, is far weaker: any count beats it.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def unigram_counts(dataset_dir: str | Path, languages: list[str] | None = None, sources: list[str] | None = None,
                   split: str = "train") -> np.ndarray:
    """Token counts over the `split` documents of a built dataset (only those in `languages` and of `sources` when
    given)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    d = Path(dataset_dir)
    manifest = json.loads((d / "manifest.json").read_text())
    table = pq.read_table(d / manifest["index"], columns=["split", "source", "language", "shard", "offset",
                                                          "n_tokens"])
    table = table.filter(pc.equal(table["split"], split))
    for column, keep in (("language", languages), ("source", sources)):
        if keep:
            table = table.filter(pc.is_in(table[column], value_set=pa.array(list(keep))))
    if table.num_rows == 0:
        raise ValueError(f"{d}: no {split} documents" + (f" in {', '.join(languages)}" if languages else "")
                         + (f" of {', '.join(sources)}" if sources else ""))
    dtype, counts, maps = np.dtype(manifest["dtype"]), None, {}
    for shard, offset, n in zip(table["shard"].to_pylist(), table["offset"].to_pylist(),
                                table["n_tokens"].to_pylist(), strict=True):
        mm = maps.get(shard)
        if mm is None:
            mm = maps[shard] = np.memmap(d / shard, dtype=dtype, mode="r")
        c = np.bincount(mm[offset:offset + n], minlength=manifest["tokenizer"]["vocab_size"])
        counts = c if counts is None else counts + c
    return counts


def unigram_bpb(counts: np.ndarray, token_ids: list[list[int]], texts: list[str], alpha: float = 0.1) -> float:
    """Bits per byte of `texts` (tokenized as `token_ids`, without <s>) under the add-`alpha` unigram of `counts`:
    the bits of every token over the UTF-8 bytes of all texts, as `bpb_metrics` counts them for a model."""
    logp = np.log2((counts + alpha) / (counts.sum() + alpha * len(counts)))
    bits = -sum(float(logp[np.asarray(ids, dtype=np.int64)].sum()) for ids in token_ids)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    if nbytes == 0 or not math.isfinite(bits):
        raise ValueError("unigram_bpb: no text to score")
    return bits / nbytes
