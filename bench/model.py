"""Forward+backward tokens/s: apertus vs transformers' ApertusForCausalLM, same config, same weights, same batch.

    python bench/model.py [--preset tiny] [--batch 8] [--seq 512] [--steps 5]

Both models are converted to the dtype under test (fp32, bf16) and run interleaved so machine noise hits both.
The log (bench/_log.py) goes to bench/results/model-<preset>-<batch>x<seq>.json
"""

import argparse
import tempfile

import torch
import transformers
from _log import BenchLog, ratio
from _timing import interleaved

from apertus import build_model, load_model, preset, save_model
from apertus.train.recipe import fast_dtype


def step(model, ids, hf: bool):
    out = model(ids)
    logits = out.logits if hf else out
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"],
                    help="default: fp32, and bf16 where bf16 matrix products are fast (~10x slower without the units)")
    args = ap.parse_args()
    dtypes = args.dtypes or (["fp32", "bf16"] if fast_dtype() == "bf16" else ["fp32"])
    log = BenchLog("model", [args.preset, f"{args.batch}x{args.seq}"])
    torch.manual_seed(0)
    cfg = preset(args.preset)
    with tempfile.TemporaryDirectory() as d:
        save_model(build_model(cfg, seed=0), d)
        ours32 = load_model(d).train()
        ref32 = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    tokens = args.batch * args.seq
    print(f"forward+backward, {args.preset} ({ours32.num_params() / 1e6:.1f}M params), batch {args.batch} x "
          f"{args.seq}, {torch.get_num_threads()} threads")
    print(f"{'dtype':6} {'apertus tok/s':>14} {'transformers tok/s':>19} {'ratio':>6}")
    seconds = {}
    for name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        ours, ref = ours32.to(dtype), ref32.to(dtype)
        t = interleaved({"ours": lambda m=ours: step(m, ids, False), "ref": lambda m=ref: step(m, ids, True)},
                        rounds=args.steps)
        a, b = t["ours"], t["ref"]
        seconds[name] = {"apertus": a, "transformers": b}
        print(f"{name:6} {tokens / a:14,.0f} {tokens / b:19,.0f} {b / a:5.2f}x")
        log.row(f"forward+backward, {args.preset}, {args.batch}×{args.seq}, {name}", f"{tokens / a:,.0f} tok/s",
                f"transformers `ApertusForCausalLM` {tokens / b:,.0f} tok/s", ratio(b / a))
    log.write({"preset": args.preset, "params_m": round(ours32.num_params() / 1e6, 1), "batch": args.batch,
               "seq": args.seq, "tokens_per_step": tokens, "rounds": args.steps, "seconds_per_step": seconds})


if __name__ == "__main__":
    main()
