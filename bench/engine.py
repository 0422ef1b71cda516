"""Generation tokens/s: the apertus engine vs transformers' `generate`, same checkpoint, same prompts, greedy.

    python bench/engine.py [--preset tiny] [--dtype fp32] [--new 64] [--concurrency 1 8 32] [--prefill 1024]
    python bench/engine.py --preset apertus-8b --dtype bf16 --concurrency 1 64 --cache-gb 40   # one H200

- decode: one request (16-token prompt) generating --new tokens; tokens/s of the whole call.
- C concurrent: C requests with prompts of 16..256 tokens (mixed), each generating --new tokens; the engine takes
  them as submitted requests (continuous batching), transformers as one left-padded batch; total new tokens/s.
- C concurrent, mixed output lengths: as above but request i wants between --new/4 and 2·--new tokens; a static
  batch runs until its longest request is done, so only the tokens asked for are counted, for both.
- prefill: one prompt of --prefill tokens and a single new token; prompt tokens/s.
- int8: decode at batch 1 with our weight-only int8 linears (CPU), against transformers in --dtype.
- decode at batch 1 against transformers at its fastest documented setup too: a static cache
  (`cache_implementation="static"`) and its forward through torch.compile (--no-static skips it).
Our engine runs with compile=True (every step through torch.compile, compiled before timing); the row "decode,
batch 1, eager" shows the engine without it (--no-compile: every row eager).
Requests generate exactly what they ask for (EOS ignored) so both sides do the same work. Ours and transformers
alternate (bench/_timing.py) so machine noise hits both; the ratio is transformers' time over ours. Both models
are built in memory with the same random weights (no checkpoint on disk, so an 8B run needs no disk).
The log (bench/_log.py) goes to bench/results/engine-<preset>-<dtype>[-eager][-<device>].json
"""

import argparse
import copy

import torch
import transformers
from _log import BenchLog, ratio
from _shapes import SHAPES, shape_config
from _timing import interleaved

from apertus import build_model, preset
from apertus.checkpoint import parse_dtype
from apertus.infer import Engine, SamplingParams


def hf_generate(model, prompts, new: int, **kw):
    """transformers' batched greedy generate, left padding (its recommended setup for decoder-only batches); `kw`
    goes to `generate` (e.g. cache_implementation="static")."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[3] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                             pad_token_id=3, **kw)
    assert out.shape[1] == width + new


def build_pair(cfg, device, dtype):
    """Our model and transformers' ApertusForCausalLM with the same random weights, both in eval mode (also used by
    bench/gpu.py)."""
    ours = build_model(cfg, device=device, dtype=dtype, seed=0).eval()
    with torch.device(device):
        ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg.to_hf_dict()),
                                                            dtype=dtype)
    ref.load_state_dict(ours.state_dict())
    return ours, ref.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", help="a preset (tiny, apertus-8b) or a shape of bench/_shapes.py "
                    "(74m, 150m, 1.4b: the real vocabulary)")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 row")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cache-gb", type=float, default=2.0)
    ap.add_argument("--no-compile", action="store_true", help="our engine without torch.compile")
    ap.add_argument("--no-static", action="store_true", help="skip the row against transformers with a static "
                    "cache and torch.compile (it compiles for minutes)")
    args = ap.parse_args()
    log = BenchLog("engine", [args.preset, args.dtype, "eager" if args.no_compile else "",
                              args.device if args.device != "cpu" else ""])
    dtype = parse_dtype(args.dtype)
    cfg = shape_config(args.preset) if args.preset in SHAPES else preset(args.preset)
    g = torch.Generator().manual_seed(0)
    ours, ref = build_pair(cfg, args.device, dtype)
    compile = not args.no_compile
    # no prefix caching: every round repeats its prompts, and a cache hit would skip the prefill being measured
    # (bench/prefix.py measures the cache)
    eager = Engine(ours, max_batch=1, cache_gb=args.cache_gb, prefix_caching=False) if compile else None
    engine = Engine(ours, max_batch=max(args.concurrency), cache_gb=args.cache_gb, compile=compile,
                    prefix_caching=False)
    greedy = SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"greedy generation, {args.preset} ({ours.num_params() / 1e6:,.1f}M params, vocab {cfg.vocab_size}), "
          f"{args.dtype}, {where}, {args.new} new tokens per request, ours {'compiled' if compile else 'eager'}")
    print(f"{'workload':24} {'apertus tok/s':>14} {'transformers tok/s':>19} {'ratio':>6}")
    measured = []

    def row(name, tokens, ours, theirs, unit="tok/s", peer="transformers `generate`"):
        t = interleaved({"ours": ours, "ref": theirs}, rounds=args.rounds)
        print(f"{name:24} {tokens / t['ours']:14,.0f} {tokens / t['ref']:19,.0f} {t['ref'] / t['ours']:5.2f}x",
              flush=True)
        measured.append({"workload": name, "peer": peer, "tokens": tokens,
                         "seconds": {"apertus": t["ours"], "peer": t["ref"]}})
        how = "" if "eager" in name else ", compiled" if compile else ", eager"
        new = ("" if unit != "tok/s" else f", {args.new // 4}–{2 * args.new} new tokens" if "mixed" in name
               else f", {args.new} new tokens")
        log.row(f"{name}, {args.preset}, {args.dtype}{how}{new}",
                f"{tokens / t['ours']:,.0f} {unit}", f"{peer} {tokens / t['ref']:,.0f} {unit}",
                ratio(t["ref"] / t["ours"]))

    def make_prompts(lengths):
        return [[1] + torch.randint(1000, cfg.vocab_size, (n - 1,), generator=g).tolist() for n in lengths]

    for c in args.concurrency:
        prompts = make_prompts([16] if c == 1 else torch.randint(16, 257, (c,), generator=g).tolist())
        name = "decode, batch 1" if c == 1 else f"{c} concurrent requests"
        row(name, c * args.new, lambda p=prompts: engine.generate(p, greedy),
            lambda p=prompts: hf_generate(ref, p, args.new))
        if c == 1 and eager is not None:
            row("decode, batch 1, eager", args.new, lambda p=prompts: eager.generate(p, greedy),
                lambda p=prompts: hf_generate(ref, p, args.new))
        if c == 1 and compile and not args.no_static:
            # transformers at its fastest documented setup: a static cache and the forward through torch.compile
            # (its "static cache and torch.compile" guide; generate() compiles by itself only on GPUs)
            fast = copy.deepcopy(ref)
            fast.forward = torch.compile(fast.forward, fullgraph=True)
            row("decode, batch 1", args.new, lambda p=prompts: engine.generate(p, greedy),
                lambda p=prompts, m=fast: hf_generate(m, p, args.new, cache_implementation="static"),
                peer="transformers `generate`, static cache + torch.compile")
            del fast
    c = max(args.concurrency)
    prompts = make_prompts(torch.randint(16, 257, (c,), generator=g).tolist())
    wants = torch.randint(args.new // 4, 2 * args.new + 1, (c,), generator=g).tolist()
    mixed = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in wants]
    row(f"{c} concurrent, mixed out", sum(wants), lambda: engine.generate(prompts, mixed),
        lambda: hf_generate(ref, prompts, max(wants)))
    prompt = make_prompts([args.prefill])
    one = SamplingParams(temperature=0, max_tokens=1)
    row(f"prefill {args.prefill} tokens", args.prefill, lambda: engine.generate(prompt, one),
        lambda: hf_generate(ref, prompt, 1), unit="prompt tok/s")
    for e in (engine, eager):
        if e is not None:
            e.close()
    if not args.no_int8 and args.device == "cpu":
        int8 = Engine(copy.deepcopy(ours), quantize="int8", max_batch=1, cache_gb=args.cache_gb, compile=compile,
                      prefix_caching=False)
        prompt = make_prompts([16])
        row("decode b1, ours int8", args.new, lambda: int8.generate(prompt, greedy),
            lambda: hf_generate(ref, prompt, args.new))
        int8.close()
    log.write({"preset": args.preset, "params_m": round(ours.num_params() / 1e6, 1), "dtype": args.dtype,
               "device": args.device, "compiled": compile, "new_tokens": args.new, "concurrency": args.concurrency,
               "prefill": args.prefill, "rounds": args.rounds, "workloads": measured})


if __name__ == "__main__":
    main()
