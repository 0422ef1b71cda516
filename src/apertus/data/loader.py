"""PackedLoader: packed `seq_len` rows with document boundaries from a built dataset.

The batch contract every training batch follows (the loss, the loop and the tests build on it): a dict of
`input_ids` (B, T), `labels` (B, T) = the inputs shifted by one, `loss_mask` (B, T) false where the input is an
end-of-document token (no loss on predicting across documents), and `position_ids` (B, T) restarting at 0 after
every end-of-document token (Megatron's --reset-position-ids; `apertus.model.document_mask` turns them into the
attention mask that keeps each document to itself).

Each source is an endless token stream: its documents in a seeded order per epoch (seed, stage, source, epoch),
epochs back to back. Row k of a source is stream[k*T : k*T + T + 1]. A stage mixes its sources by weight with
Megatron's blending rule (each row goes to the source furthest behind its share), so proportions are exact at every
prefix. Global row g of a stage is a pure function of (seed, stage, g); rank r of w takes rows r::w of each global
batch, so the union over ranks does not depend on w. `state_dict()` holds the stage, the row and the per-source
counts: resuming from it continues the exact sequence.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch

EOD = 2


class PackedLoader:
    def __init__(self, dataset_dir, seq_len: int, batch_size: int, *, stage: str | None = None, split: str = "train",
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.dir = Path(dataset_dir)
        mpath = self.dir / "manifest.json"
        if not mpath.is_file():
            raise FileNotFoundError(f"{self.dir}: not a built dataset (no manifest.json); run `apertus data build`")
        self.manifest = json.loads(mpath.read_text())
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError("seq_len and batch_size must be positive")
        self.seq_len, self.batch_size, self.split, self.seed = seq_len, batch_size, split, seed
        self.rank, self.world_size = rank, world_size
        self.eod = self.manifest["tokenizer"]["eos_id"]
        self._load_docs()
        self.stages = []
        for st in self.manifest["stages"]:
            docs = self._stage_docs(st.get("languages"))
            weights = {s: float(w) for s, w in st["sources"].items() if s in docs}
            if weights:
                self.stages.append({"name": st["name"], "weights": weights, "tokens": st.get("tokens"), "docs": docs})
        if not self.stages:
            raise ValueError(f"{self.dir}: no {split} documents for any stage")
        names = [s["name"] for s in self.stages]
        if stage is not None and stage not in names:
            raise ValueError(f"stage {stage!r} not in this dataset's stages ({', '.join(names)})")
        self.fixed_stage = stage
        self._enter(names.index(stage) if stage is not None else 0)

    # --- data ---------------------------------------------------------------------------------------------------
    def _load_docs(self):
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        dtype = np.dtype(self.manifest["dtype"])
        table = pq.read_table(self.dir / self.manifest["index"], columns=["source", "split", "shard", "offset",
                                                                          "n_tokens", "language"])
        table = table.filter(pc.equal(table["split"], self.split))
        self.shard_names = sorted(set(table["shard"].to_pylist()))
        self.shards = [np.memmap(self.dir / s, dtype=dtype, mode="r") for s in self.shard_names]
        shard_id = {s: i for i, s in enumerate(self.shard_names)}
        self._sources = np.asarray(table["source"].to_pylist(), dtype=object)
        self._languages = np.asarray(table["language"].to_pylist(), dtype=object)
        self._shard = np.asarray([shard_id[s] for s in table["shard"].to_pylist()], dtype=np.int64)
        self._offset = table["offset"].to_numpy().astype(np.int64)
        self._ntok = table["n_tokens"].to_numpy().astype(np.int64)
        self._epochs = {}

    def _stage_docs(self, languages=None) -> dict:
        """Per source: (shard, offset, n_tokens, total tokens) of its documents, only those in `languages` if the
        stage names some (a curriculum that spends a stage on a few languages of a multilingual dataset)."""
        keep = np.isin(self._languages, list(languages)) if languages else np.ones(len(self._sources), bool)
        docs = {}
        for s in sorted(set(self._sources[keep])):
            m = keep & (self._sources == s)
            docs[s] = (self._shard[m], self._offset[m], self._ntok[m], int(self._ntok[m].sum()))
        return docs

    def _epoch(self, source: str, epoch: int):
        key = (self.stage_index, source, epoch)
        if key not in self._epochs:
            if len(self._epochs) > 8:
                self._epochs.pop(next(iter(self._epochs)))
            ss = np.random.SeedSequence([self.seed, self.stage_index, zlib.crc32(source.encode()), epoch])
            order = np.random.default_rng(ss).permutation(len(self.docs[source][0]))
            self._epochs[key] = (order, np.cumsum(self.docs[source][2][order]))
        return self._epochs[key]

    def _window(self, source: str, start: int, length: int) -> np.ndarray:
        shard, offset, ntok, total = self.docs[source]
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            epoch, pos = divmod(start + filled, total)
            order, ends = self._epoch(source, epoch)
            i = int(np.searchsorted(ends, pos, side="right"))
            while filled < length and i < len(order):
                d = order[i]
                within = pos - (ends[i] - ntok[d])
                take = min(int(ntok[d] - within), length - filled)
                a = offset[d] + within
                out[filled:filled + take] = self.shards[shard[d]][a:a + take]
                filled, pos, i = filled + take, pos + take, i + 1
        return out

    # --- mixing -------------------------------------------------------------------------------------------------
    def _enter(self, stage_index: int, row: int = 0, counts=None):
        self.stage_index = stage_index
        st = self.stages[stage_index]
        self.docs = st["docs"]
        self.sources = sorted(st["weights"])
        w = np.array([st["weights"][s] for s in self.sources])
        self.weights = w / w.sum()
        self.row = row
        self.counts = np.zeros(len(self.sources), np.int64) if counts is None else np.asarray(counts, np.int64)

    def _next_source(self) -> int:
        # Megatron BlendedDataset: the source whose share is most behind its weight (ties: lowest index)
        i = int(np.argmax(self.weights * (self.row + 1) - self.counts))
        self.counts[i] += 1
        self.row += 1
        return i

    def _maybe_next_stage(self):
        st = self.stages[self.stage_index]
        if self.fixed_stage is None and st["tokens"] and self.stage_index + 1 < len(self.stages) \
                and self.row * self.seq_len >= st["tokens"]:
            self._enter(self.stage_index + 1)

    @property
    def stage(self) -> str:
        return self.stages[self.stage_index]["name"]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self._maybe_next_stage()
        T, rows = self.seq_len, []
        for j in range(self.batch_size * self.world_size):
            i = self._next_source()
            k = self.counts[i] - 1
            if j % self.world_size == self.rank:
                rows.append(self._window(self.sources[i], int(k) * T, T + 1))
        x = np.stack(rows)
        inputs, labels = x[:, :-1], x[:, 1:]
        is_eod = inputs == self.eod
        # position ids restart after every EoD (Megatron --reset-position-ids)
        idx = np.broadcast_to(np.arange(T), inputs.shape)
        starts = np.zeros_like(inputs)
        starts[:, 1:] = np.where(is_eod[:, :-1], idx[:, 1:], 0)
        pos = idx - np.maximum.accumulate(starts, axis=1)
        return {"input_ids": torch.from_numpy(np.ascontiguousarray(inputs)),
                "labels": torch.from_numpy(np.ascontiguousarray(labels)),
                "loss_mask": torch.from_numpy(~is_eod),
                "position_ids": torch.from_numpy(pos)}

    # --- resume -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": 1, "seed": self.seed, "split": self.split, "seq_len": self.seq_len,
                "stage": self.stage, "row": int(self.row), "counts": self.counts.tolist(), "sources": self.sources}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "split", "seq_len"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"loader state has {key}={state.get(key)!r}, this loader {getattr(self, key)!r}")
        names = [s["name"] for s in self.stages]
        if state["stage"] not in names or (self.fixed_stage and state["stage"] != self.fixed_stage):
            raise ValueError(f"loader state is in stage {state['stage']!r}, not available here")
        self._enter(names.index(state["stage"]), state["row"], state["counts"])
        if self.sources != state["sources"]:
            raise ValueError("loader state was saved on a dataset with other sources in this stage")


def val_documents(dataset_dir, language: str | None = None):
    """Held-out documents (split "val") one by one: dicts with id, source, language, n_bytes and `tokens` (numpy,
    with <s> and </s>) — what bits-per-byte per language needs."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    d = Path(dataset_dir)
    manifest = json.loads((d / "manifest.json").read_text())
    table = pq.read_table(d / manifest["index"])
    table = table.filter(pc.equal(table["split"], "val"))
    if language is not None:
        table = table.filter(pc.equal(table["language"], language))
    dtype, maps = np.dtype(manifest["dtype"]), {}
    for row in table.to_pylist():
        mm = maps.get(row["shard"])
        if mm is None:
            mm = maps[row["shard"]] = np.memmap(d / row["shard"], dtype=dtype, mode="r")
        yield {"id": row["id"], "source": row["source"], "language": row["language"], "n_bytes": row["n_bytes"],
               "tokens": np.asarray(mm[row["offset"]: row["offset"] + row["n_tokens"]])}
