"""Data pipeline throughput, per core (one process): documents/s and tokens/s of
  1. tokenization alone: ours (apertus.data.shards.encode_docs, <s> text </s> into uint32 arrays) vs datatrove's
     DocumentTokenizer-style path (tokenizers `encode_batch` with the post-processor, ids kept as Python lists);
  2. the filter phase of the default recipe on UDHR + FLORES (ingest with LID and token count, quality, PII,
     toxicity) vs datatrove's stock pipeline of the same readers and quality filters alone;
  3. the loader: PackedLoader rows vs slicing one pre-concatenated array (an upper bound).
Run: PYTHONPATH=src python bench/data.py
The log (bench/_log.py) goes to bench/results/data.json
"""

import os
import sys
import tempfile
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _log import BenchLog, ratio  # noqa: E402
from _timing import interleaved  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "1")  # per core: the Rust tokenizer would otherwise use every core

from apertus.config import data_root  # noqa: E402
from apertus.data.pipeline import load_recipe, phases  # noqa: E402
from apertus.data.readers import SIB200Source, UDHRSource  # noqa: E402
from apertus.data.shards import encode_docs, load_tokenizer  # noqa: E402
from apertus.data.steps import Funnel, Tracked, quality_filter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def docs():
    f = Funnel()
    return [*UDHRSource("udhr", str(data_root() / "udhr"), f).run(None, 0, 1),
            *SIB200Source("flores", str(data_root() / "sib200/annotated"), f, group=10).run(None, 0, 1)]


def main():
    from loguru import logger

    logger.remove()
    log = BenchLog("data")
    corpus = docs()
    texts = [d.text for d in corpus]
    from apertus.tokenizer import apertus_tokenizer_path

    tok, bos, eos = load_tokenizer(str(apertus_tokenizer_path()))
    n_tok = sum(len(a) for a in encode_docs(tok, texts, bos, eos, np.uint32))
    mb = sum(len(t.encode()) for t in texts) / 1e6
    t = interleaved({"ours": lambda: encode_docs(tok, texts, bos, eos, np.uint32),
                     "encode_batch": lambda: [e.ids for e in tok.encode_batch(texts)]}, rounds=3)
    print(f"tokenization, 1 core, {len(texts):,} docs / {mb:.1f} MB / {n_tok:,} tokens")
    for k, v in t.items():
        print(f"  {k:<13} {len(texts) / v:9,.0f} docs/s {n_tok / v:12,.0f} tokens/s {mb / v:6.2f} MB/s")
    print(f"  ratio ours/encode_batch time: {t['ours'] / t['encode_batch']:.2f}")
    log.row(f"tokenization, 1 core, {len(texts):,} UDHR + FLORES docs ({mb:.1f} MB)",
            f"{n_tok / t['ours']:,.0f} tok/s", f"datatrove-style `encode_batch` {n_tok / t['encode_batch']:,.0f} tok/s",
            ratio(t["encode_batch"] / t["ours"]))
    measured = {"docs": len(texts), "megabytes": mb, "tokens": n_tok, "tokenization_seconds": t}

    recipe = load_recipe(ROOT / "recipes/data_tiny.toml")
    recipe["sources"] = [s for s in recipe["sources"] if s["name"] in ("udhr", "flores")]
    with tempfile.TemporaryDirectory() as tmp:
        _, ours, _ = phases(recipe, Path(tmp))[0]
        ours = [s for s in ours if type(s).__name__ not in ("JsonlWriter", "SaveFunnel")]
        readers, steps = ours[:2], ours[2:]
        f = Funnel()
        stock = [Tracked(quality_filter(n, o), n, f) for n, o in recipe["steps"]["quality"].items()
                 if n != "apply_to"]

        def run(pipeline):
            data = iter(list(corpus))
            for s in pipeline:
                data = s(data, 0, 1)
            deque(data, maxlen=0)

        t = interleaved({"ours": lambda: run(steps), "quality only": lambda: run(stock)}, rounds=2)
        assert readers
    print(f"filter phase (default recipe steps), 1 core, {len(corpus):,} docs / {n_tok:,} tokens")
    for k, v in t.items():
        print(f"  {k:<13} {len(corpus) / v:9,.0f} docs/s {n_tok / v:12,.0f} tokens/s")
    print(f"  ratio ours/quality-only time: {t['ours'] / t['quality only']:.2f} (the cost of LID, token counting, "
          f"PII and toxicity on top of datatrove's filters)")
    log.row("filter phase of the default recipe, 1 core (ours adds LID, token counts, PII, toxicity)",
            f"{len(corpus) / t['ours']:,.0f} docs/s",
            f"datatrove quality filters alone {len(corpus) / t['quality only']:,.0f} docs/s",
            ratio(t["quality only"] / t["ours"]))
    measured["filter_seconds"] = t

    out = Path(os.environ.get("APERTUS_BENCH_DATASET", ""))
    if (out / "manifest.json").exists():
        from apertus.data.loader import PackedLoader

        loader = PackedLoader(out, 4096, 8)
        flat = np.concatenate([m for m in loader.shards])

        def slicing(state={"i": 0}):  # noqa: B006
            rows = [flat[(state["i"] + k) * 4096 % (len(flat) - 4097):][:4097] for k in range(8)]
            state["i"] += 8
            return np.stack(rows)

        t = interleaved({"PackedLoader": lambda: next(loader), "array slicing": slicing}, rounds=20)
        for k, v in t.items():
            print(f"  loader {k:<14} {8 * 4096 / v:14,.0f} tokens/s")
        log.row("loader, 8×4096 rows", f"{8 * 4096 / t['PackedLoader']:,.0f} tok/s",
                f"slicing one array (upper bound) {8 * 4096 / t['array slicing']:,.0f} tok/s",
                ratio(t["array slicing"] / t["PackedLoader"]))
        measured["loader_seconds"] = t
    else:
        print("(set APERTUS_BENCH_DATASET=<built dataset> to also time the loader)")
    log.write(measured)


if __name__ == "__main__":
    main()
