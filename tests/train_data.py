"""Batches for the training tests, following the batch contract of apertus.data.loader without a built dataset.

Real text (tinyshakespeare speeches; UDHR articles in German, French, Italian and Romansh) is tokenised with the real
Apertus tokenizer, each document as <s> + text + </s>; token ids are then renumbered densely (specials 0-3 kept), so
tiny models get a ~12k vocabulary with the real tokenisation. Held-out documents give per-language validation.
"""

from __future__ import annotations

import functools
import os
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import torch

from apertus.config import data_root
from apertus.model import packed_position_ids
from apertus.train.loss import token_byte_lengths

BOD, EOD = 1, 2
UDHR = {"de": "deu_1996", "fr": "fra", "it": "ita", "rm": "roh_rumgr"}


@dataclass
class Corpus:
    train: list[list[int]]  # documents (dense ids, <s> ... </s>)
    val: dict[str, list[list[int]]]  # held-out documents per language
    vocab_size: int
    token_bytes: torch.Tensor  # UTF-8 bytes of each dense id (0 for specials)
    to_real: torch.Tensor  # dense id -> Apertus id


def udhr_articles(key: str) -> list[str]:
    root = ET.parse(data_root() / "udhr" / f"udhr_{key}.xml").getroot()
    ns = {"u": "http://efele.net/udhr"}
    return [" ".join(" ".join("".join(p.itertext()).split()) for p in art.iter("{http://efele.net/udhr}para"))
            for art in root.findall(".//u:article", ns)]


CACHE_ENV = "APERTUS_TEST_CORPUS"  # a test's saved corpus(), so its child processes skip the tokenisation


def save_corpus(path) -> str:
    torch.save(vars(corpus()), path)
    return str(path)


@functools.cache
def corpus(max_vocab: int | None = None) -> Corpus:
    """The corpus; with `max_vocab`, only the most frequent ids are kept and the rest become <unk> (id 0)."""
    import collections

    if max_vocab is None and os.environ.get(CACHE_ENV):
        return Corpus(**torch.load(os.environ[CACHE_ENV]))

    from tokenizers import Tokenizer

    from apertus.tokenizer import apertus_tokenizer_path

    tok_file = apertus_tokenizer_path()
    tok = Tokenizer.from_file(str(tok_file))
    text = (data_root() / "tinyshakespeare" / "input.txt").read_text()
    speeches = [s.strip() for s in re.split(r"\n\s*\n", text) if s.strip()]
    n_val = len(speeches) // 20
    groups = {"train": speeches[:-n_val], "en": speeches[-n_val:]}
    for lang, key in UDHR.items():
        arts = udhr_articles(key)
        groups["train"] += arts[:22]
        groups[lang] = arts[22:]
    encoded = {k: [[BOD] + e.ids + [EOD] for e in tok.encode_batch(v, add_special_tokens=False)]
               for k, v in groups.items()}
    freq = collections.Counter(i for d in encoded["train"] for i in d if i > 3)
    real_ids = sorted({i for docs in encoded.values() for d in docs for i in d} - {0, 1, 2, 3})
    if max_vocab:
        real_ids = sorted(i for i, _ in freq.most_common(max_vocab - 4))
    to_real = torch.tensor([0, 1, 2, 3] + real_ids)
    dense = {r: i for i, r in enumerate(to_real.tolist())}
    docs = {k: [[dense.get(i, 0) for i in d] for d in v] for k, v in encoded.items()}
    real_bytes = token_byte_lengths(tok_file)  # <unk> (0) carries no bytes: unknown tokens drop out of bpb
    return Corpus(train=docs.pop("train"), val=docs, vocab_size=len(to_real), token_bytes=real_bytes[to_real],
                  to_real=to_real)


class StreamLoader:
    """The PackedLoader contract over documents: the documents (shuffled by `seed`) form one token stream; row j of
    the global order is stream[j·T : j·T + T + 1]; each call takes the next batch_size x world_size global rows, rank
    r getting rows r::w (batch_size rows), as apertus.data.loader.PackedLoader does."""

    def __init__(self, docs, seq_len, batch_size, *, seed=0, rank=0, world_size=1, delay=0.0):
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
        self.stream = torch.tensor([t for i in order for t in docs[i]])
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.rows = (len(self.stream) - 1) // seq_len
        self.pos, self.delay = 0, delay  # delay: seconds per batch, to let a test kill a run between steps

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.delay)
        T = self.seq_len
        n = self.batch_size * self.world_size
        rows = [self.stream[(j % self.rows) * T:(j % self.rows) * T + T + 1]
                for j in range(self.pos + self.rank, self.pos + n, self.world_size)]
        self.pos += n
        x = torch.stack(rows)
        inputs, labels = x[:, :-1], x[:, 1:]
        starts = torch.zeros_like(inputs, dtype=torch.bool)
        starts[:, 1:] = inputs[:, :-1] == EOD
        return {"input_ids": inputs, "labels": labels, "loss_mask": inputs != EOD,
                "position_ids": packed_position_ids(starts)}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def make_loader(rank=0, world_size=1, docs=None, delay=0.0):
    """A pretrain `make_loader(stage)` over the corpus (or `docs`), rows for this rank of each global micro-batch."""
    docs = docs if docs is not None else corpus().train

    def make(stage):
        return StreamLoader(docs, stage.seq_len, stage.micro_batch, seed=stage.seed, rank=rank,
                            world_size=world_size, delay=delay)

    return make


def val_batches(seq_len, global_rows, n_batches, rank=0, world_size=1, langs=("en", "de", "fr"), c=None):
    """Held-out batches per language: the same rows in total whatever the world size (rank r takes r::w)."""
    c = c or corpus()
    out = {}
    for lang in langs:
        it = StreamLoader(c.val[lang], seq_len, global_rows // world_size, rank=rank, world_size=world_size)
        out[lang] = [next(it) for _ in range(n_batches)]
    return out


def tiny_recipe(**train) -> dict:
    """A recipe table for a model small enough for tests (the corpus' vocabulary)."""
    t = dict(seq_len=64, global_batch_tokens=64 * 8, micro_batch=4, steps=8, dtype="fp32", log_every=100,
             grad_clip=1.0, peak_flops=1e12)
    t.update(train)
    return {"model": {"preset": "tiny", "vocab_size": corpus().vocab_size, "hidden_size": 64,
                      "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 2},
            "train": t,
            "optim": {"lr": 3e-3, "min_lr": 3e-4, "t_alpha": 4, "t_beta3": 4, "weight_decay": 0.1},
            "schedule": {"warmup_tokens": 64 * 8 * 2, "cooldown_tokens": 64 * 8 * 2}}
