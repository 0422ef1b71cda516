"""Training throughput: apertus (its loss, AdEMAMix, optional torch.compile) vs transformers' ApertusForCausalLM, same
config, same weights, same batches, bf16 autocast over fp32 master weights on both sides (or fp32 on both sides:
`--dtype auto`, the default, takes fp32 on a CPU without bf16 matrix units, as the tiny recipes do).

    python bench/train.py [--shape tiny|74m|150m] [--batch 8] [--seq 512] [--rounds 5] [--sides a,b,...] [--tag T]

Sides (`--sides`, default: all that fit the shape in memory):
    transformers                   eager, torch AdamW (foreach): the default setup
    transformers+compile           torch.compile(model), torch AdamW(fused=True): its fastest documented setup
    transformers+compile+AdEMAMix  the same model with our compiled AdEMAMix: the optimizer's own cost
    apertus                        eager blocks, loss and AdEMAMix
    apertus+compile                compiled blocks, chunked loss and AdEMAMix (recipes' `compile = true`)
    apertus+compile+AdamW          the same with torch AdamW(fused=True): AdamW on both sides

Our step keeps every training feature on: the Goldfish mask (k = h = 50) and document masking over packed documents
(128–1024 tokens), which transformers' step does not do (a plain causal row). One "step" is a full optimizer step:
forward, backward, gradient clipping, optimizer update. MFU is measured against this machine's matmul peak in that
dtype (2048³ matmuls, timed in the same rounds as the steps), the CPU analogue of the 989 TFLOP/s reference on GPUs.
Both sides run in one process, so both get `import apertus`'s allocator settings (huge pages, freed memory kept).
The log (bench/_log.py) goes to bench/results/train-<shape>-<batch>x<seq>-<dtype>[-<tag>].json
"""

import argparse
import dataclasses
import os
import tempfile
import time

# isort: off
import apertus  # noqa: F401  (before torch: it sets the allocator's environment that torch reads as it loads)
# isort: on
import torch
import transformers
from _log import BenchLog, ratio
from _shapes import shape_config
from _timing import interleaved

from apertus import build_model, load_model, save_model
from apertus.model import packed_position_ids
from apertus.train.distributed import Dist, clip_grad_norm_, parallelize
from apertus.train.loss import lm_loss
from apertus.train.optim import build_optimizer
from apertus.train.recipe import fast_dtype

SIDES = ("transformers", "transformers+compile", "transformers+compile+AdEMAMix", "apertus", "apertus+compile",
         "apertus+compile+AdamW")
# ~6 GB per side at 150m (fp32 weights, gradients and two or three optimizer states of 0.3B parameters): the
# comparison that matters, within 24 GB
DEFAULT_SIDES = {"150m": ("transformers", "transformers+compile", "apertus+compile")}
PEER_SETUP = {"transformers": "transformers eager + torch AdamW (foreach)",
              "transformers+compile": "transformers + torch.compile + torch AdamW(fused=True)",
              "transformers+compile+AdEMAMix": "transformers + torch.compile + our AdEMAMix (compiled)"}


def ours_step(model, opt, batch, bf16: bool, compile: bool) -> torch.Tensor:
    """One optimizer step on the batch's device; the loss (detached, not synchronised)."""
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
        loss_sum, n = lm_loss(model, batch, goldfish=(50, 50), document_masking=True, compile=compile)
    loss = loss_sum / n
    loss.backward()
    clip_grad_norm_(list(model.parameters()), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def profile_parts(model, opt, batch, bf16: bool, compile: bool, steps: int = 3) -> dict:
    """Seconds per part of our step (mean of `steps` after two warm-up steps): embedding and blocks forward, the
    output layer and loss (with its gradients, computed in forward), backward through the blocks, clipping,
    optimizer update."""
    from apertus.model import document_mask
    from apertus.train.loss import goldfish_mask, linear_cross_entropy

    parts = dict.fromkeys(("forward", "output layer + loss", "backward", "clip", "optimizer"), 0.0)
    for step in range(steps + 2):
        t = [time.perf_counter()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pos = batch["position_ids"]
            hidden = model.hidden_states(batch["input_ids"], position_ids=pos, attn_mask=document_mask(pos))
            t.append(time.perf_counter())
            mask = batch["loss_mask"] & goldfish_mask(batch["labels"])
            loss = linear_cross_entropy(hidden, model.lm_head.weight, batch["labels"], mask, compile=compile)
        t.append(time.perf_counter())
        (loss / mask.sum()).backward()
        t.append(time.perf_counter())
        clip_grad_norm_(list(model.parameters()), 1.0)
        t.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        if step >= 2:
            for k, a, b in zip(parts, t[:-1], t[1:], strict=True):
                parts[k] += (b - a) / steps
    return parts


def hf_step(model, opt, batch, bf16: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def batches(cfg, batch: int, seq: int):
    """Random token rows: ours packed with documents of 128–1024 tokens (the shifted pair, with position ids that
    restart per document), and transformers' plain row (it shifts the labels itself)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    starts = torch.zeros(batch, seq, dtype=torch.bool)
    for row in starts:
        at = 0
        while at < seq:
            row[at] = True
            at += int(torch.randint(128, 1025, (1,), generator=g))
    ours = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(batch, seq, dtype=torch.bool),
            "position_ids": packed_position_ids(starts)}
    return ours, {"input_ids": ids[:, :-1], "labels": ids[:, :-1]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["tiny", "74m", "150m"], default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sides", help=f"comma-separated, from: {', '.join(SIDES)}")
    ap.add_argument("--tag", help="a suffix for the log's name, for a run with other --sides (\"optimizers\" at 150m, "
                                  "where all sides do not fit in 24 GB together)")
    ap.add_argument("--profile", action="store_true",
                    help="instead: seconds per part of our eager and compiled steps (THP_MEM_ALLOC_ENABLE=0 to see "
                         "the step on 4 KB pages)")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                    help="bf16 autocast or fp32 (auto: bf16 where bf16 matrix products are fast)")
    args = ap.parse_args()
    sides = args.sides.split(",") if args.sides else DEFAULT_SIDES.get(args.shape, SIDES)
    if unknown := set(sides) - set(SIDES):
        ap.error(f"--sides: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SIDES)}")
    dtype = fast_dtype() if args.dtype == "auto" else args.dtype
    bf16 = dtype == "bf16"
    how = "bf16 autocast" if bf16 else "fp32"
    log = BenchLog("train", [args.shape, f"{args.batch}x{args.seq}", dtype, args.tag])
    cfg = shape_config(args.shape)
    ours_batch, hf_batch = batches(cfg, args.batch, args.seq)
    params = cfg.num_params()
    if args.profile:
        return profile(args, cfg, ours_batch, bf16, dtype)
    fns = {}
    with tempfile.TemporaryDirectory() as d:
        save_model(build_model(cfg, seed=0), d)
        for side in sides:
            compile = "compile" in side
            adamw = "AdamW" in side or side in ("transformers", "transformers+compile")
            if side.startswith("transformers"):
                model = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").train()
                if compile:
                    model = torch.compile(model)
                opt = (torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=compile,
                                         foreach=not compile) if adamw else
                       build_optimizer(model, "ademamix", lr=1e-4, weight_decay=0.1, t_alpha=1000, t_beta3=1000,
                                       compile=True))
                fns[side] = lambda m=model, o=opt: hf_step(m, o, hf_batch, bf16)
            else:
                model = parallelize(load_model(d).train(), Dist(), compile=compile)
                opt = build_optimizer(model, "adamw" if adamw else "ademamix", lr=1e-4, weight_decay=0.1,
                                      t_alpha=1000, t_beta3=1000, compile=compile)
                fns[side] = lambda m=model, o=opt, c=compile: ours_step(m, o, ours_batch, bf16, c)
    tokens = args.batch * args.seq
    flops = cfg.flops_per_token(args.seq) * tokens
    mm = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(2048, 2048, dtype=mm), torch.randn(2048, 2048, dtype=mm)
    # the matmul peak is timed in the same rounds as the steps, so load from other processes affects both alike
    fns["matmul"] = lambda: [a @ b for _ in range(4)]
    t = interleaved(fns, rounds=args.rounds, warmup=2)
    peak = 4 * 2 * 2048**3 / t.pop("matmul")
    print(f"training step (fwd+bwd+clip+optimizer), {args.shape} ({params / 1e6:.1f}M params, vocabulary "
          f"{cfg.vocab_size:,}), batch {args.batch} x {args.seq}, {how}, {torch.get_num_threads()} threads; {dtype} "
          f"matmul peak {peak / 1e9:,.0f} GFLOP/s")
    peers = [p for p in ("transformers+compile", "transformers") if p in t]
    print(f"{'':30} {'tokens/s':>10} {'MFU':>6}" + "".join(f" {'vs ' + p:>24}" for p in peers))
    for name, sec in t.items():
        print(f"{name:30} {tokens / sec:10,.0f} {100 * flops / sec / peak:5.1f}%"
              + "".join(f" {t[p] / sec:23.2f}x" for p in peers))
    size = f"{args.shape} ({params / 1e6:.0f}M, vocab {cfg.vocab_size:,}), {args.batch}×{args.seq}, {how}"
    for name in ("apertus+compile", "apertus", "apertus+compile+AdamW"):
        # each of ours against the peer's best setup present, and the compiled step against the default too
        for peer in peers[:1] + (["transformers"] if name == "apertus+compile" and len(peers) > 1 else []):
            if name in t:
                what = {"apertus+compile": "torch.compile + AdEMAMix", "apertus": "eager + AdEMAMix",
                        "apertus+compile+AdamW": "torch.compile + torch AdamW(fused=True)"}[name]
                log.row(f"training step, {size}, {what}, Goldfish + document masking (MFU "
                        f"{100 * flops / t[name] / peak:.1f}%)", f"{tokens / t[name]:,.0f} tok/s",
                        f"{PEER_SETUP[peer]} {tokens / t[peer]:,.0f} tok/s", ratio(t[peer] / t[name]))
    if "transformers+compile+AdEMAMix" in t and "transformers+compile" in t:
        log.row(f"training step, {size}, transformers + torch.compile with our AdEMAMix (compiled) vs its fused "
                f"AdamW: the optimizer's cost", f"{tokens / t['transformers+compile+AdEMAMix']:,.0f} tok/s",
                f"{PEER_SETUP['transformers+compile']} {tokens / t['transformers+compile']:,.0f} tok/s",
                ratio(t["transformers+compile"] / t["transformers+compile+AdEMAMix"]))
    log.write({"shape": args.shape, "config": dataclasses.asdict(cfg), "params_m": round(params / 1e6, 1),
               "batch": args.batch, "seq": args.seq, "tokens_per_step": tokens, "flops_per_step": flops,
               "rounds": args.rounds, "dtype": dtype, "matmul_peak_flops": peak, "sides": sides,
               "peer_setup": PEER_SETUP, "seconds_per_step": t,
               "mfu": {name: flops / sec / peak for name, sec in t.items()}})


def profile(args, cfg, batch, bf16: bool, dtype: str):
    small_pages = os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
    log = BenchLog("train", [args.shape, f"{args.batch}x{args.seq}", dtype, "profile", "4k" if small_pages else ""])
    result = {}
    for compile in (False, True):
        model = parallelize(build_model(cfg, seed=0).train(), Dist(), compile=compile)
        opt = build_optimizer(model, "ademamix", lr=1e-4, weight_decay=0.1, t_alpha=1000, t_beta3=1000,
                              compile=compile)
        name = f"{'compiled' if compile else 'eager'}, {'4 KB pages' if small_pages else 'huge pages'}"
        result[name] = profile_parts(model, opt, batch, bf16, compile)
        del model, opt
    print(f"seconds per part of our step, {args.shape}, {args.batch} x {args.seq}, {dtype}")
    for name, parts in result.items():
        print(f"{name:24} " + "  ".join(f"{k} {v:.3f}" for k, v in parts.items())
              + f"  total {sum(parts.values()):.3f}")
    log.write({"shape": args.shape, "batch": args.batch, "seq": args.seq, "dtype": dtype, "seconds_per_part": result})


if __name__ == "__main__":
    main()
