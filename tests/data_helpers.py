"""Helpers shared by the data tests: a tiny BPE tokenizer with the Apertus special ids and small corpora."""

import json
from pathlib import Path


def tiny_tokenizer(folder: Path) -> Path:
    """A deterministic byte-level BPE with <unk> <s> </s> <pad> at ids 0-3 (so <s>=1, </s>=2 as in Apertus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = folder / "tokenizer.json"
    if path.exists():
        return path
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text_of(i) for i in range(50)], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu river mountain forest ocean desert valley "
         "city village bridge tower garden market school library museum station harbor castle temple").split()


def text_of(seed: int, n_words: int = 120) -> str:
    """A distinct pseudo-English paragraph per seed (deterministic), with sentences and punctuation."""
    import random

    rng = random.Random(seed)
    sents = []
    while sum(len(s.split()) for s in sents) < n_words:
        sents.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + ".")
    return " ".join(sents)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return path
