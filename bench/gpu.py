"""The GPU benchmark: one H200 in about 8 minutes, one JSON log. Run it through bench/gpu.sh.

    bench/gpu.sh                   # --size h200: one H200 (or any big CUDA GPU)
    bench/gpu.sh --size tiny       # the CPU smoke run (seconds): tiny shapes, eager, few steps; labelled "smoke"

Sections (each a key of the log, with "status": ok / failed / interrupted / pending, and its "seconds"):
- parity: our model against transformers' ApertusForCausalLM, same random weights (the inference model, bf16 on CUDA,
  fp32 on CPU): max and mean |logit difference|, argmax agreement, and whether tests/test_model.py's tolerance holds.
- train: training steps (forward, backward, clipping, AdEMAMix; Goldfish mask and document masking on) of a ~1B model
  (`ONE_B`), bf16 autocast over fp32 master weights, blocks, chunked loss and AdEMAMix update through torch.compile
  as a recipe's `compile = true` does (bench/train.py's step); tokens/s and MFU.
- fsdp: the same steps with the model sharded by FSDP2 (`apertus.train.distributed.shard`, bf16 parameters) in a
  single-rank process group (NCCL on CUDA, gloo on CPU) created in this process: the sharded code path, world size 1.
- engine: our engine (compiled) against transformers' `generate` with a static cache (which transformers compiles
  itself on GPUs, "reduce-overhead"), same weights as parity: decode at batch 1 and 64, prefill of 8k and 64k tokens.
MFU = flops / seconds / peak, flops = ApertusConfig.flops_per_token(seq) x tokens = (6 N_matmul + 12 L H D T) x tokens
(N_matmul: parameters without the input embedding; attention not halved for causality), peak --peak-tflops (989: H200
bf16 dense). The log (bench/_log.py) is rewritten after every section and engine workload, so a run cut short keeps
what it measured; only a CUDA run at --size h200 writes README rows (bench/table.py skips "smoke" logs).
"""

import argparse
import dataclasses
import gc
import math
import sys
import time

import torch
from _log import BenchLog, ratio
from _timing import interleaved
from engine import build_pair, hf_generate
from train import batches, ours_step

from apertus import build_model, preset
from apertus.infer import Engine, SamplingParams
from apertus.train.distributed import Dist, parallelize, shard
from apertus.train.optim import build_optimizer

# ~1B: Apertus-8B's vocabulary, head size and MLP ratio (5.25), 16 layers of width 2048: 1.44B parameters, 1.17B of
# them in matmuls (without the input embedding)
ONE_B = dataclasses.replace(preset("apertus-8b"), hidden_size=2048, intermediate_size=10752, num_hidden_layers=16,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=None)
# the CPU smoke run's model: the tiny preset made smaller still, so that every section runs in a second or two
SMOKE = dataclasses.replace(preset("tiny"), vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=None)


def config_of(name: str):
    """ApertusConfig of a model name: "1b", "smoke" or a preset."""
    return {"1b": ONE_B, "smoke": SMOKE}.get(name) or preset(name)


@dataclasses.dataclass(frozen=True)
class Size:
    train: str  # model of the train and fsdp sections (`config_of`)
    infer: str  # model of the parity and engine sections
    batch: int
    seq: int
    steps: int  # timed training steps (the median is reported)
    warmup: int  # untimed steps before them (compilation)
    parity_shape: tuple[int, int]
    new: int  # new tokens per decoding request
    decode_batches: tuple[int, ...]
    decode_prompt: int  # prompt tokens of each request of a batched decode (batch 1: 16)
    prefills: tuple[int, ...]  # prompt tokens of the prefill workloads (one new token each)
    rounds: int  # timed rounds of each engine workload, after one warm-up round
    cache_gb: float


SIZES = {
    # 65,535 prompt tokens + 1 new one = the 8B's whole context (65,536)
    "h200": Size("1b", "apertus-8b", batch=4, seq=4096, steps=5, warmup=2, parity_shape=(2, 1024), new=128,
                 decode_batches=(1, 64), decode_prompt=128, prefills=(8192, 65535), rounds=3, cache_gb=16),
    "tiny": Size("smoke", "smoke", batch=2, seq=32, steps=1, warmup=1, parity_shape=(2, 32), new=4,
                 decode_batches=(1, 4), decode_prompt=16, prefills=(256, 512), rounds=1, cache_gb=0.1),
}
SECTIONS = ("train", "fsdp", "parity", "engine")


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device):
    """Release a section's model, optimizer and compiled graphs before the next one."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else None


def time_steps(model, opt, cfg, size: Size, device, peak_flops: float, compile: bool) -> dict:
    """`size.warmup` steps (compilation), then `size.steps` timed ones, on one fixed random batch (its loss falls)."""
    batch = {k: v.to(device) for k, v in batches(cfg, size.batch, size.seq)[0].items()}  # Goldfish, documents
    bf16 = device.type == "cuda"  # fp32 on CPU: the smoke run's CPU may have no bf16 matrix units
    losses, seconds = [], []
    for i in range(size.warmup + size.steps):
        sync(device)
        t = time.perf_counter()
        loss = ours_step(model, opt, batch, bf16, compile)
        sync(device)
        if i >= size.warmup:
            seconds.append(time.perf_counter() - t)
        losses.append(loss.item())
    sec = sorted(seconds)[len(seconds) // 2]
    tokens = size.batch * size.seq
    flops = cfg.flops_per_token(size.seq) * tokens
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"training loss is not finite: {losses}")
    return {"params": cfg.num_params(), "params_matmul": cfg.num_params(embeddings=False), "batch": size.batch,
            "seq": size.seq, "dtype": "bf16 autocast, fp32 master weights" if bf16 else "fp32",
            "tokens_per_step": tokens, "flops_per_step": flops, "seconds_per_step": sec,
            "seconds_all_steps": seconds, "tokens_per_s": tokens / sec, "mfu": flops / sec / peak_flops,
            "losses": losses, "peak_memory_gib": peak_gib(device)}


def train_setup(size: Size, device, compile: bool, fsdp: bool = False, param_dtype=None):
    """The train and fsdp sections' model (blocks through `parallelize`; with `fsdp`, then sharded by `shard` in
    `param_dtype`) and its AdEMAMix optimizer, built after sharding so that it holds the sharded parameters."""
    cfg = config_of(size.train)
    model = build_model(cfg, device=device, seed=0).train()
    parallelize(model, Dist(device=device), compile=compile)
    if fsdp:
        shard(model, param_dtype)
    opt = build_optimizer(model, "ademamix", lr=1e-3, weight_decay=0.1, t_alpha=1000, t_beta3=1000, compile=compile)
    return cfg, model, opt


def train_section(size: Size, device, compile: bool, peak_flops: float) -> dict:
    cfg, model, opt = train_setup(size, device, compile)
    return {"model": size.train, "compiled": compile, **time_steps(model, opt, cfg, size, device, peak_flops, compile)}


def fsdp_section(size: Size, device, compile: bool, peak_flops: float) -> dict:
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("fsdp: a process group already exists; run bench/gpu.py as a single process")
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if cuda else None)
    try:
        param_dtype = torch.bfloat16 if cuda else None
        cfg, model, opt = train_setup(size, device, compile, fsdp=True, param_dtype=param_dtype)
        sharded = sum(type(p).__name__ == "DTensor" for p in model.parameters())
        if sharded != len(list(model.parameters())):
            raise RuntimeError(f"fsdp: only {sharded} parameters are DTensors after fully_shard")
        out = time_steps(model, opt, cfg, size, device, peak_flops, compile)
        return {"model": size.train, "world_size": dist.get_world_size(), "backend": dist.get_backend(),
                "compiled": compile, "param_dtype": str(param_dtype)[6:] if param_dtype else "fp32",
                "sharded_parameters": sharded, **out}
    finally:
        dist.destroy_process_group()


def parity_section(size: Size, device, pair) -> dict:
    cfg, ours, ref = pair
    ids = torch.randint(0, cfg.vocab_size, size.parity_shape, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        a, b = ours(ids).float(), ref(ids).logits.float()
    diff = (a - b).abs()
    scale = b.abs().max().item()
    return {"model": size.infer, "params": ours.num_params(), "dtype": str(ours.lm_head.weight.dtype)[6:],
            "batch": size.parity_shape[0], "seq": size.parity_shape[1], "max_abs_diff": diff.max().item(),
            "mean_abs_diff": diff.mean().item(), "max_abs_logit": scale,
            "argmax_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            "within_test_tolerance": diff.max().item() <= 2e-2 * max(1.0, scale)}


def engine_section(size: Size, device, compile: bool, pair, out: dict, save):
    """Fills `out`, calling `save` after each workload. The workloads go in order of growing length: transformers
    sizes each new static cache to the longest one so far."""
    cfg, ours, ref = pair
    g = torch.Generator().manual_seed(2)

    def prompts(n, length):
        return [[1] + torch.randint(1000, cfg.vocab_size, (length - 1,), generator=g).tolist() for _ in range(n)]

    # no prefix caching: the rounds repeat their prompts, and a cache hit would skip the prefill being measured
    engine = Engine(ours, max_batch=max(size.decode_batches), cache_gb=size.cache_gb, compile=compile,
                    prefix_caching=False)
    peer = "transformers `generate`, static cache" + (", torch.compile" if device.type == "cuda" else ", eager")
    out.update({"model": size.infer, "dtype": str(ours.lm_head.weight.dtype)[6:], "compiled": compile, "peer": peer,
                "new_tokens": size.new, "workloads": []})
    work = [(f"decode, batch {b}", prompts(b, 16 if b == 1 else size.decode_prompt), size.new, b * size.new)
            for b in size.decode_batches]
    work += [(f"prefill {n} tokens", prompts(1, n), 1, n) for n in size.prefills]
    try:
        for name, ps, new, tokens in work:
            params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
            t = interleaved({"apertus": lambda ps=ps, p=params: (engine.generate(ps, p), sync(device)),
                             "peer": lambda ps=ps, new=new: (hf_generate(ref, ps, new, cache_implementation="static"),
                                                             sync(device))},
                            rounds=size.rounds if tokens < 32768 else 1)  # the 64k prefill: one timed round
            out["workloads"].append({"workload": name, "requests": len(ps), "prompt_tokens": len(ps[0]),
                                     "new_tokens": new, "tokens": tokens, "seconds": t,
                                     "tokens_per_s": {k: tokens / v for k, v in t.items()},
                                     "ratio": t["peer"] / t["apertus"]})
            print(f"  {name}: {tokens / t['apertus']:,.0f} vs {tokens / t['peer']:,.0f} tok/s", flush=True)
            save()
    finally:
        engine.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="h200")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction,
                    help="torch.compile for training and our engine (default: on, off at --size tiny)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of MFU (989: H100/H200)")
    args = ap.parse_args(argv)
    size = SIZES[args.size]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if args.size != "tiny" and device.type != "cuda":
        raise SystemExit(f"bench/gpu.py: --size {args.size} needs a CUDA GPU (none visible); "
                         "--size tiny is the CPU smoke run")
    compile = args.compile if args.compile is not None else args.size != "tiny"
    real = device.type == "cuda" and args.size != "tiny"
    log = BenchLog("gpu", [args.size, device.type])
    peak = args.peak_tflops * 1e12
    sections = {name: {"status": "pending" if name in args.sections else "not requested"} for name in SECTIONS}
    measurements = {"size": args.size, "smoke": not real, "device": device.type, "compiled": compile,
                    "peak_flops": peak, "flops": "ApertusConfig.flops_per_token(seq) x tokens: (6 N_matmul + 12 L H D "
                    "T) per token, N_matmul without the input embedding, attention not halved for causality",
                    **sections}
    if not real:
        measurements["note"] = (f"smoke run ({device.type}, --size {args.size}): it checks that every section runs; "
                                "its figures say nothing about GPU performance")

    def save():  # a smoke run's rows are kept out of the README's table, under their own key
        log.rows = rows(measurements) if real else []
        log.write(measurements if real else {**measurements, "smoke_rows": rows(measurements)})

    pair = None
    for name in [s for s in SECTIONS if s in args.sections]:
        print(f"== {name}", flush=True)
        result = measurements[name] = {"status": "running"}
        t = time.perf_counter()
        try:
            if name in ("parity", "engine") and pair is None:  # same random weights; bf16 on CUDA, fp32 on CPU
                cfg = config_of(size.infer)
                pair = (cfg, *build_pair(cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32))
            if name == "train":
                result.update(train_section(size, device, compile, peak))
            elif name == "fsdp":
                result.update(fsdp_section(size, device, compile, peak))
            elif name == "parity":
                result.update(parity_section(size, device, pair))
            else:
                engine_section(size, device, compile, pair, result, save)
            result["status"] = "ok"
        except KeyboardInterrupt:  # bench/gpu.sh's time limit (SIGINT): keep what was measured
            result.update(status="interrupted", seconds=time.perf_counter() - t)
            save()
            return 130
        except Exception as e:  # the other sections still run; the log names the failure
            result.update(status="failed", error=f"{type(e).__name__}: {e}")
            print(f"{name} failed: {result['error']}", file=sys.stderr, flush=True)
        result["seconds"] = time.perf_counter() - t
        if name in ("train", "fsdp"):  # parity's models stay for the engine section
            free(device)
        save()
        print({k: v for k, v in result.items() if not isinstance(v, list)}, flush=True)
    failed = [s for s in SECTIONS if measurements[s]["status"] == "failed"]
    if failed:
        print(f"bench/gpu.py: section(s) {', '.join(failed)} failed; see {log.path}", file=sys.stderr)
    return 1 if failed else 0


def rows(m: dict) -> list[dict]:
    """README rows of a real (CUDA, --size h200) run: the sections that finished."""
    out = []
    for name in ("train", "fsdp"):
        r = m[name]
        if r["status"] == "ok":
            how = r["dtype"] + (f", FSDP2 world size 1, {r['param_dtype']} params" if name == "fsdp" else "")
            out.append({"benchmark": f"`bench/gpu.py` training step, {r['model']} ({r['params'] / 1e9:.2f}B), "
                        f"{r['batch']}×{r['seq']}, {how}, {'torch.compile' if r['compiled'] else 'eager'} "
                        f"(MFU {100 * r['mfu']:.1f}% of {m['peak_flops'] / 1e12:.0f} TFLOP/s)",
                        "apertus": f"{r['tokens_per_s']:,.0f} tok/s", "peer": "", "ratio": ""})
    for w in m["engine"].get("workloads", []):
        unit = "prompt tok/s" if w["workload"].startswith("prefill") else "tok/s"
        new = "" if unit != "tok/s" else f", {w['new_tokens']} new tokens"
        how = "compiled" if m["engine"]["compiled"] else "eager"
        out.append({"benchmark": f"`bench/gpu.py` {w['workload']}, {m['engine']['model']}, {m['engine']['dtype']}, "
                                 f"{how}{new}",
                    "apertus": f"{w['tokens_per_s']['apertus']:,.0f} {unit}",
                    "peer": f"{m['engine']['peer']} {w['tokens_per_s']['peer']:,.0f} {unit}",
                    "ratio": ratio(w["ratio"])})
    return out


if __name__ == "__main__":
    sys.exit(main())
