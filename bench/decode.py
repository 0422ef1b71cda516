"""Single-stream decoding at the sizes people run: the apertus engine against llama.cpp on the same weights.

    python bench/decode.py --shape 1.4b [--modes bf16 int8 int4] [--new 64] [--rounds 3] [--no-compile]
    python bench/decode.py --shape 8b --modes int8 int4 --sequential --new 32 --rounds 2   # Apertus-8B, 24 GiB
    python bench/decode.py --shape 8b --modes bf16 --sequential --prompt 16000 --new 16 --rounds 2
    python bench/decode.py --shape 8b --startup    # start-up rows only

One checkpoint of random weights (seed 0, bf16, the released Apertus tokenizer) is written once per shape into
--work (default ~/.cache/apertus/bench/decode-<shape>; reused by later runs) and exported to GGUF: bf16, Q8_0
(gguf-py's quantizer, as llama.cpp's converter writes it) and Q4_0 (llama.cpp's own quantizer). Each precision is
then a pair, ours and llama.cpp's (llama-cpp-python, n_threads = torch's threads):
    bf16 ↔ GGUF bf16,   int8 (our weight-only int8 linears) ↔ Q8_0,   int4 (int4, groups of 32) ↔ Q4_0
- start-up: loading the checkpoint until the first token of a 32-token prompt is out; ours eager (the safetensors
  mapped; int8/int4 twice: the first start quantizes and keeps the layers in the quantize cache, here in --work, the
  second maps them from there), and compiled (printed: inductor's persistent cache, compile_cache_dir(), makes a
  second run faster); --startup stops there;
- decode: a 32-token prompt and --new greedy tokens, one request, whole call (EOS ignored on both sides);
- --prompt N: a prompt of N tokens read and one token answered (ours in chunks of 2,048: chunked prefill).
Ours and llama.cpp alternate (bench/_timing.py), rounds median; with --sequential, all of ours, then all of
llama.cpp's (the 8B's two bf16 copies would not fit in 24 GiB together). llama-cpp-python builds llama.cpp from source
(~10 minutes): `pip install 'apertus[llama]'`; without it this script says so and stops.
The log (bench/_log.py) goes to bench/results/decode-<shape>[-<modes>][-prompt<N>][-eager].json
"""

import argparse
import os
import resource
import time
from pathlib import Path

# isort: off
import apertus  # noqa: F401  (before torch: it sets the allocator's environment that torch reads as it loads)
# isort: on
import torch
from _log import BenchLog, ratio
from _shapes import shape_config
from _timing import interleaved

from apertus import build_model, save_model
from apertus.export_gguf import export_gguf
from apertus.infer import Engine, SamplingParams
from apertus.infer.cache import PagedKVCache
from apertus.infer.quant import cache_file
from apertus.tokenizer import apertus_tokenizer_path

PEER_FILE = {"bf16": ("bf16", None), "int8": ("bf16", "q8_0"), "int4": ("bf16", "q4_0")}
PEER_NAME = {"bf16": "GGUF bf16", "int8": "Q8_0", "int4": "Q4_0"}


def prepare(shape: str, work: Path, modes) -> tuple[Path, dict]:
    """The checkpoint and the GGUF files the modes need, written once into `work` (each step atomic, so an
    interrupted run resumes where it stopped)."""
    cfg = shape_config(shape)
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        print(f"writing a {shape} checkpoint of random weights to {hf} ...", flush=True)
        model = build_model(cfg, device="meta").to(torch.bfloat16)  # bf16 from the start: the 8B in 16 GB, not 32
        model.to_empty(device="cpu").init_weights(seed=0)
        save_model(model, hf, extra_files={"tokenizer.json": apertus_tokenizer_path().read_text()})
        del model
    ggufs = {}
    for mode in modes:
        dtype, quant = PEER_FILE[mode]
        path = work / f"model-{quant or dtype}.gguf"
        if not path.is_file():
            print(f"exporting {path.name} ...", flush=True)
            export_gguf(hf, path, dtype=dtype, quant=quant)
        ggufs[mode] = path
    return hf, ggufs


def llama_generate(llm, prompt: list[int], new: int):
    """`new` greedy tokens after `prompt`, llama.cpp's own loop (llama-cpp-python's generate: sampling in C)."""
    llm.reset()  # forget the previous round's tokens: generate() would otherwise reuse their cache as a prefix
    for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
        if i + 1 == new:
            return


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["74m", "150m", "1.4b", "8b"], default="1.4b")
    ap.add_argument("--modes", nargs="+", choices=list(PEER_FILE), default=list(PEER_FILE))
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=0, help="also time reading a prompt of this many tokens")
    ap.add_argument("--no-compile", action="store_true", help="our engine without torch.compile")
    ap.add_argument("--sequential", action="store_true", help="all of our rounds, then all of llama.cpp's (for "
                    "sizes where both sides' weights do not fit in memory together: the 8B in bf16 on 24 GiB)")
    ap.add_argument("--work", type=Path, help="checkpoint and GGUF files (default ~/.cache/apertus/bench/decode-SHAPE)")
    ap.add_argument("--startup", action="store_true", help="only the eager start-up rows")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("bench/decode.py: llama.cpp is the peer here; pip install 'apertus[llama]' (it compiles "
                         "llama.cpp, ~10 minutes)") from None
    work = args.work or Path(os.path.expanduser("~/.cache/apertus/bench")) / f"decode-{args.shape}"
    hf, ggufs = prepare(args.shape, work, args.modes)
    os.environ["APERTUS_QUANT_CACHE"] = str(work / "quantized")  # beside the checkpoint, not in the user's cache
    compile = not args.no_compile
    how = "compiled" if compile else "eager"
    log = BenchLog("decode", [args.shape, "-".join(args.modes) if args.modes != list(PEER_FILE) else "",
                              f"prompt{args.prompt}" if args.prompt else "",
                              "startup" if args.startup else "" if compile else "eager"])
    cfg = shape_config(args.shape)
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    prompt = [1] + torch.randint(1000, cfg.vocab_size, (31,), generator=g).tolist()
    long_prompt = [1] + torch.randint(1000, cfg.vocab_size, (max(args.prompt, 2) - 1,), generator=g).tolist()
    greedy = SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    params = cfg.num_params()
    print(f"greedy decoding, {args.shape} ({params / 1e9:.2f}B params, vocab {cfg.vocab_size}), cpu, {threads} "
          f"threads, 32-token prompt + {args.new} new tokens; ours {how}, llama.cpp "
          f"{llama_cpp.__version__}", flush=True)
    cache_gb = max(0.5, (args.prompt + 64) * PagedKVCache.bytes_per_token(cfg, torch.bfloat16) / 2**30)
    label = f"{args.shape} ({params / 1e9:.2f}B, vocab 131,072)"

    def open_ours(quantize, compile):
        t = time.perf_counter()  # start-up: load (mapped, or quantized), compile if asked, answer
        engine = Engine(hf, dtype="bf16", quantize=quantize, max_batch=1, cache_gb=cache_gb, compile=compile,
                        prefix_caching=False)
        engine.generate([prompt], one)
        return engine, time.perf_counter() - t

    def open_peer(mode):
        t = time.perf_counter()
        llm = llama_cpp.Llama(str(ggufs[mode]), n_ctx=max(512, args.prompt + 64), n_threads=threads,
                              n_threads_batch=threads, n_batch=2048, n_ubatch=512, verbose=False)
        llama_generate(llm, prompt, 1)
        return llm, time.perf_counter() - t

    def measure(mode: str) -> dict:
        name, peer = f"{mode} ({PEER_NAME[mode]})", f"llama.cpp {PEER_NAME[mode]}"
        quantize = None if mode == "bf16" else mode
        if quantize:  # the first start quantizes (and keeps the layers), the second maps what the first kept
            cache_file(hf, quantize, torch.bfloat16).unlink(missing_ok=True)
        eager_starts = []
        for _ in range(2 if quantize else 1):
            eager, seconds = open_ours(quantize, False)
            eager_starts.append(seconds)
            print(f"{name:16} start-up: ours {seconds:5.1f} s eager ({'; '.join(eager.start_info) or 'mapped'})",
                  flush=True)
            eager.close()
            del eager  # its weights (8 GB for the 8B in int8) go before the next engine loads its own
        eager_start = eager_starts[0]
        if args.startup:
            llm, peer_start = open_peer(mode)
            llm.close()
            print(f"{name:16} start-up: llama.cpp {peer_start:5.1f} s", flush=True)
            log_startup(mode, label, eager_starts, peer_start)
            return {"mode": mode, "peer": PEER_NAME[mode], "startup_seconds": {
                "apertus eager": eager_starts[0], "apertus eager, from the quantize cache": eager_starts[1:],
                "peer": peer_start}}
        # (ours, peer) callables per workload: decoding, and reading the long prompt
        work = {"decode": (lambda e: e.generate([prompt], greedy), lambda p: llama_generate(p, prompt, args.new))}
        if args.prompt:
            work["prompt"] = (lambda e: e.generate([long_prompt], one), lambda p: llama_generate(p, long_prompt, 1))
        rounds = {"decode": (args.rounds, 1), "prompt": (1, 0)}
        if args.sequential:  # ours first, closed, then llama.cpp: never both in memory
            engine, start = open_ours(quantize, compile)
            info = engine.compile_info
            ours = {w: interleaved({"ours": lambda f=f: f(engine)}, *rounds[w])["ours"] for w, (f, _) in work.items()}
            engine.close()
            llm, peer_start = open_peer(mode)
            theirs = {w: interleaved({"peer": lambda f=f: f(llm)}, *rounds[w])["peer"] for w, (_, f) in work.items()}
            times = {w: {"ours": ours[w], "peer": theirs[w]} for w in work}
        else:
            llm, peer_start = open_peer(mode)
            engine, start = open_ours(quantize, compile)
            info = engine.compile_info
            times = {w: interleaved({"ours": lambda f=f: f(engine), "peer": lambda f=g: f(llm)}, *rounds[w])
                     for w, (f, g) in work.items()}
            engine.close()
        llm.close()
        print(f"{name:16} start-up: ours {eager_start:5.1f} s eager, {start:6.1f} s {how} "
              f"({info['message'] if info else 'eager'}); llama.cpp {peer_start:5.1f} s", flush=True)
        log_startup(mode, label, eager_starts, peer_start)
        tm = times["decode"]
        print(f"{name:16} decode: ours {args.new / tm['ours']:6.2f} tok/s, llama.cpp {args.new / tm['peer']:6.2f} "
              f"tok/s, {tm['peer'] / tm['ours']:.2f}x; peak RSS so far {rss_gb():.1f} GiB", flush=True)
        log.row(f"decode, batch 1, {label}, {mode}, {how}, 32-token prompt + {args.new} new tokens",
                f"{args.new / tm['ours']:,.1f} tok/s", f"{peer} {args.new / tm['peer']:,.1f} tok/s",
                ratio(tm["peer"] / tm["ours"]))
        if args.prompt:
            tp = times["prompt"]
            print(f"{name:16} {args.prompt}-token prompt: ours {tp['ours']:6.1f} s, llama.cpp {tp['peer']:6.1f} s",
                  flush=True)
            log.row(f"prompt of {args.prompt:,} tokens read + 1 answered, {label}, {mode}, {how}",
                    f"{args.prompt / tp['ours']:,.0f} prompt tok/s", f"{peer} {args.prompt / tp['peer']:,.0f} prompt "
                    "tok/s", ratio(tp["peer"] / tp["ours"]))
        return {"mode": mode, "peer": PEER_NAME[mode], "gguf_bytes": ggufs[mode].stat().st_size,
                "startup_seconds": {"apertus eager": eager_start, "apertus eager, from the quantize cache":
                                    eager_starts[1:], f"apertus {how}": start, "peer": peer_start},
                "compile_info": info, "seconds": times, "peak_rss_gib": round(rss_gb(), 2)}

    def log_startup(mode: str, label: str, eager_starts: list[float], peer_start: float):
        peer = f"llama.cpp {PEER_NAME[mode]} {peer_start:,.1f} s"
        first = "eager" if mode == "bf16" else "eager, quantizing"
        log.row(f"start-up to the first token, {label}, {mode}, {first}", f"{eager_starts[0]:,.1f} s", peer,
                ratio(peer_start / eager_starts[0]))
        if len(eager_starts) > 1:
            log.row(f"start-up to the first token, {label}, {mode}, eager, from the quantize cache",
                    f"{eager_starts[1]:,.1f} s", peer, ratio(peer_start / eager_starts[1]))

    measured = [measure(mode) for mode in args.modes]
    log.write({"shape": args.shape, "sequential": args.sequential, "params_b": round(params / 1e9, 3),
               "compiled": compile, "new_tokens": args.new,
               "prompt_tokens": 32, "long_prompt": args.prompt, "rounds": args.rounds, "threads": threads,
               "llama_cpp_python": llama_cpp.__version__, "peak_rss_gib": round(rss_gb(), 2), "modes": measured})


if __name__ == "__main__":
    main()
