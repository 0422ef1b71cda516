"""Training throughput: apertus (its loss, AdEMAMix, optional torch.compile) vs transformers' ApertusForCausalLM +
torch AdamW, same config, same weights, same batches, bf16 autocast over fp32 master weights on both sides (or fp32
on both sides: `--dtype auto`, the default, takes fp32 on a CPU without bf16 matrix units, as the tiny recipes do).

    python bench/train.py [--preset tiny] [--batch 8] [--seq 512] [--rounds 5] [--no-compile] [--dtype auto]

One "step" is a full optimizer step: forward, backward, gradient clipping, optimizer update. MFU is measured against
this machine's matmul peak in that dtype (2048³ matmuls, timed in the same rounds as the steps), the CPU analogue of the
989 TFLOP/s reference on GPUs.
The log (bench/_log.py) goes to bench/results/train-<preset>-<batch>x<seq>-<dtype>[-eager].json
"""

import argparse
import tempfile

import torch
import transformers
from _log import BenchLog, ratio
from _timing import interleaved

from apertus import build_model, load_model, preset, save_model
from apertus.train.distributed import Dist, clip_grad_norm_, parallelize
from apertus.train.loss import lm_loss
from apertus.train.optim import build_optimizer
from apertus.train.recipe import fast_dtype


def ours_step(model, opt, batch, bf16: bool) -> torch.Tensor:
    """One optimizer step on the batch's device; the loss (detached, not synchronised)."""
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
        loss_sum, n = lm_loss(model, batch, goldfish=None, document_masking=False)
    loss = loss_sum / n
    loss.backward()
    clip_grad_norm_(list(model.parameters()), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def hf_step(model, opt, batch, bf16: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                    help="bf16 autocast or fp32 (auto: bf16 where bf16 matrix products are fast)")
    args = ap.parse_args()
    dtype = fast_dtype() if args.dtype == "auto" else args.dtype
    bf16 = dtype == "bf16"
    how = "bf16 autocast" if bf16 else "fp32"
    log = BenchLog("train", [args.preset, f"{args.batch}x{args.seq}", dtype, "eager" if args.no_compile else ""])
    torch.manual_seed(0)
    cfg = preset(args.preset)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    # HF shifts the labels itself: give it the unshifted row; ours takes the already shifted pair
    ours_batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones_like(ids[:, 1:], dtype=bool)}
    hf_batch = {"input_ids": ids[:, :-1], "labels": ids[:, :-1]}
    with tempfile.TemporaryDirectory() as d:
        save_model(build_model(cfg, seed=0), d)
        ours = load_model(d).train()
        ref = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").train()
    opt_ours = build_optimizer(ours, "ademamix", lr=1e-4, weight_decay=0.1, t_alpha=1000, t_beta3=1000)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
    tokens = args.batch * args.seq
    flops = cfg.flops_per_token(args.seq) * tokens
    mm = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(2048, 2048, dtype=mm), torch.randn(2048, 2048, dtype=mm)
    fns = {"apertus": lambda: ours_step(ours, opt_ours, ours_batch, bf16),
           "transformers": lambda: hf_step(ref, opt_ref, hf_batch, bf16)}
    if not args.no_compile:
        compiled = build_model(cfg, seed=0).train()
        parallelize(compiled, Dist(), compile=True)
        opt_c = build_optimizer(compiled, "ademamix", lr=1e-4, weight_decay=0.1, t_alpha=1000, t_beta3=1000)
        fns["apertus+compile"] = lambda: ours_step(compiled, opt_c, ours_batch, bf16)
    # the matmul peak is timed in the same rounds as the steps, so load from other processes affects both alike
    fns["matmul"] = lambda: [a @ b for _ in range(4)]
    t = interleaved(fns, rounds=args.rounds, warmup=2)
    peak = 4 * 2 * 2048**3 / t.pop("matmul")
    print(f"training step (fwd+bwd+clip+optimizer), {args.preset} ({ours.num_params() / 1e6:.1f}M params), batch "
          f"{args.batch} x {args.seq}, {how}, {torch.get_num_threads()} threads; {dtype} matmul peak "
          f"{peak / 1e9:,.0f} GFLOP/s")
    print(f"{'':16} {'tokens/s':>10} {'MFU':>6} {'vs transformers':>16}")
    for name, sec in t.items():
        print(f"{name:16} {tokens / sec:10,.0f} {100 * flops / sec / peak:5.1f}% {t['transformers'] / sec:15.2f}x")
    peer = t["transformers"]
    for name, what in (("apertus+compile", "torch.compile"), ("apertus", "eager")):
        if name in t:
            log.row(f"training step, {args.preset}, {args.batch}×{args.seq}, {how}, {what} "
                    f"(MFU {100 * flops / t[name] / peak:.1f}%)", f"{tokens / t[name]:,.0f} tok/s",
                    f"transformers + torch AdamW {tokens / peer:,.0f} tok/s", ratio(peer / t[name]))
    log.write({"preset": args.preset, "params_m": round(ours.num_params() / 1e6, 1), "batch": args.batch,
               "seq": args.seq, "tokens_per_step": tokens, "flops_per_step": flops, "rounds": args.rounds,
               "dtype": dtype, "matmul_peak_flops": peak, "seconds_per_step": t,
               "mfu": {name: flops / sec / peak for name, sec in t.items()}})


if __name__ == "__main__":
    main()
