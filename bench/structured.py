"""Cost of constrained decoding per token: the engine with a JSON Schema (llguidance grammar mask on every row) vs the
same engine unconstrained, same model, same prompts, greedy, batch 1 and 8.

    python bench/structured.py [--preset tiny] [--dtype fp32] [--new 64] [--batch 1 8] [--no-compile]

The model is the preset with the real Apertus vocabulary (131,072 tokens: the mask's cost grows with the
vocabulary, so a smaller one would flatter it) and random weights; the tokenizer is the released one. The schema is
an array of at least 1,000 objects (bounded strings, integers, enums, booleans), so no request can finish before
--new tokens and both sides generate exactly the same number of tokens. Constrained and free runs alternate
(bench/_timing.py); the log goes to bench/results/structured-<preset>-<dtype>[-eager].json (bench/_log.py).
"""

import argparse
import dataclasses
import os

import torch
from _log import BenchLog, ratio
from _timing import interleaved

from apertus import build_model, preset
from apertus.checkpoint import parse_dtype
from apertus.infer import Engine, SamplingParams
from apertus.tokenizer import apertus_tokenizer_path

ITEM = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "ok"],
        "properties": {"name": {"type": "string", "maxLength": 12},
                       "age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
                       "ok": {"type": "boolean"}}}
SCHEMA = {"type": "array", "minItems": 1000, "items": ITEM}


def table_rows(log: BenchLog, r: dict) -> None:
    """The README rows of a structured result."""
    how = "compiled" if r["compiled"] else "eager"
    for b in r["batches"]:
        log.row(f"JSON-Schema-constrained decoding, {r['preset']} with vocab {r['vocab_size']:,}, batch {b['batch']}, "
                f"{r['dtype']}, {how}, {r['new_tokens']} new tokens",
                f"{b['constrained_tok_s']:,.2f} tok/s ({100 * b['slowdown']:+.1f}% time per token)",
                f"same engine unconstrained {b['free_tok_s']:,.2f} tok/s", ratio(1 / (1 + b["slowdown"])))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", help="results folder (default bench/results)")
    args = ap.parse_args()
    log = BenchLog("structured", [args.preset, args.dtype, "eager" if args.no_compile else ""], out=args.out)
    cfg = dataclasses.replace(preset(args.preset), vocab_size=131072)
    model = build_model(cfg, dtype=parse_dtype(args.dtype), seed=0)
    tokenizer = apertus_tokenizer_path()
    engine = Engine(model, tokenizer=tokenizer, max_batch=max(args.batch), cache_gb=1.0,
                    compile=not args.no_compile)
    free = SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True)
    constrained = dataclasses.replace(free, json_schema=SCHEMA)
    engine.generate(["warm"], constrained)  # the grammar tokenizer and the schema are built once, not timed
    g = torch.Generator().manual_seed(0)
    print(f"greedy, {args.preset} with vocab 131,072 ({model.num_params() / 1e6:,.1f}M params), {args.dtype}, "
          f"cpu {torch.get_num_threads()} threads, {'compiled' if not args.no_compile else 'eager'}, "
          f"{args.new} new tokens per request, load {os.getloadavg()[0]:.2f}")
    batches = []
    for batch in args.batch:
        prompts = [[1] + torch.randint(1000, cfg.vocab_size, (31,), generator=g).tolist() for _ in range(batch)]

        def run(params, prompts=prompts):
            out = engine.generate(prompts, params)
            assert all(len(r.output_ids) == args.new for r in out)
            return out

        t = interleaved({"free": lambda: run(free), "constrained": lambda: run(constrained)}, rounds=args.rounds)
        tokens = batch * args.new
        row = {"batch": batch, "tokens": tokens, "free_tok_s": tokens / t["free"],
               "constrained_tok_s": tokens / t["constrained"],
               "us_per_token_free": 1e6 * t["free"] / tokens,
               "us_per_token_constrained": 1e6 * t["constrained"] / tokens,
               "slowdown": t["constrained"] / t["free"] - 1}
        batches.append(row)
        print(f"batch {batch}: free {row['free_tok_s']:,.0f} tok/s, constrained {row['constrained_tok_s']:,.0f} tok/s"
              f" ({100 * row['slowdown']:+.1f}% time per token)", flush=True)
    [sample] = engine.generate([prompts[0]], dataclasses.replace(constrained, max_tokens=40))
    # the per-batch measurements are "batches": "rows" is the log's README table (bench/_log.py)
    result = {"preset": args.preset, "vocab_size": cfg.vocab_size, "dtype": args.dtype,
              "compiled": not args.no_compile, "threads": torch.get_num_threads(), "new_tokens": args.new,
              "schema": SCHEMA, "batches": batches, "sample_output": sample.text}
    engine.close()
    table_rows(log, result)
    log.write(result)


if __name__ == "__main__":
    main()
