"""Single-stream decoding at the sizes people run: the apertus engine against llama.cpp on the same weights.

    python bench/decode.py --shape 1.4b [--modes bf16 int8 int4] [--new 64] [--rounds 3] [--no-compile]
    python bench/decode.py --shape 8b --modes int8 int4 --prompt 16000    # Apertus-8B-shaped, 2 cores, 24 GiB

One checkpoint of random weights (seed 0, bf16, the released Apertus tokenizer) is written once per shape into
--work (default ~/.cache/apertus/bench/decode-<shape>; reused by later runs) and exported to GGUF: bf16, Q8_0
(gguf-py's quantizer, as llama.cpp's converter writes it) and Q4_0 (llama.cpp's own quantizer). Each precision is
then a pair, ours and llama.cpp's (llama-cpp-python, n_threads = torch's threads):
    bf16 ↔ GGUF bf16,   int8 (our weight-only int8 linears) ↔ Q8_0,   int4 (int4, groups of 32) ↔ Q4_0
- start-up: loading the checkpoint (ours maps the safetensors, quantizes where asked, compiles with the persistent
  inductor cache of compile_cache_dir()) until the first token of a 32-token prompt is out;
- decode: a 32-token prompt and --new greedy tokens, one request, whole call (EOS ignored on both sides);
- --prompt N: a prompt of N tokens read and one token answered (ours in chunks of 2,048: chunked prefill).
Ours and llama.cpp alternate (bench/_timing.py), rounds median. llama-cpp-python builds llama.cpp from source
(~10 minutes): `pip install 'apertus[llama]'`; without it this script says so and stops.
The log (bench/_log.py) goes to bench/results/decode-<shape>[-eager].json
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
        model = build_model(cfg, dtype=torch.bfloat16, seed=0)
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
    ap.add_argument("--work", type=Path, help="checkpoint and GGUF files (default ~/.cache/apertus/bench/decode-SHAPE)")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("bench/decode.py: llama.cpp is the peer here; pip install 'apertus[llama]' (it compiles "
                         "llama.cpp, ~10 minutes)") from None
    work = args.work or Path(os.path.expanduser("~/.cache/apertus/bench")) / f"decode-{args.shape}"
    hf, ggufs = prepare(args.shape, work, args.modes)
    compile = not args.no_compile
    log = BenchLog("decode", [args.shape, "" if compile else "eager"])
    cfg = shape_config(args.shape)
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    prompt = [1] + torch.randint(1000, cfg.vocab_size, (31,), generator=g).tolist()
    long_prompt = [1] + torch.randint(1000, cfg.vocab_size, (max(args.prompt, 2) - 1,), generator=g).tolist()
    greedy = SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    params = cfg.num_params()
    print(f"greedy decoding, {args.shape} ({params / 1e9:.2f}B params, vocab {cfg.vocab_size}), cpu, {threads} threads, "
          f"32-token prompt + {args.new} new tokens; ours {'compiled' if compile else 'eager'}, llama.cpp "
          f"{llama_cpp.__version__}", flush=True)
    measured = []
    cache_gb = max(0.5, 2 * (args.prompt + 64) * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
                   * 2 / 2**30)
    for mode in args.modes:
        t = time.perf_counter()
        engine = Engine(hf, dtype="bf16", quantize=None if mode == "bf16" else mode, max_batch=1, cache_gb=cache_gb,
                        compile=compile, prefix_caching=False)
        engine.generate([prompt], one)
        ours_start = time.perf_counter() - t
        t = time.perf_counter()
        llm = llama_cpp.Llama(str(ggufs[mode]), n_ctx=max(512, args.prompt + 64), n_threads=threads,
                              n_threads_batch=threads, n_batch=2048, n_ubatch=512, verbose=False)
        llama_generate(llm, prompt, 1)
        peer_start = time.perf_counter() - t
        name = f"{mode} ({PEER_NAME[mode]})"
        print(f"{name:16} start-up: ours {ours_start:6.1f} s ({engine.compile_info['message'] if compile else 'eager'})"
              f", llama.cpp {peer_start:5.1f} s; peak RSS so far {rss_gb():.1f} GiB", flush=True)
        row = {"mode": mode, "peer": PEER_NAME[mode], "gguf_bytes": ggufs[mode].stat().st_size,
               "startup_seconds": {"apertus": ours_start, "peer": peer_start},
               "compile_info": engine.compile_info}
        tm = interleaved({"ours": lambda: engine.generate([prompt], greedy),
                          "peer": lambda: llama_generate(llm, prompt, args.new)}, rounds=args.rounds)
        tokens = args.new
        print(f"{name:16} decode: ours {tokens / tm['ours']:6.2f} tok/s, llama.cpp {tokens / tm['peer']:6.2f} tok/s, "
              f"{tm['peer'] / tm['ours']:.2f}x", flush=True)
        row["decode_seconds"] = tm
        how = "compiled" if compile else "eager"
        log.row(f"decode, batch 1, {args.shape} ({params / 1e9:.2f}B, vocab 131,072), {mode}, {how}, 32-token prompt "
                f"+ {args.new} new tokens", f"{tokens / tm['ours']:,.1f} tok/s",
                f"llama.cpp {PEER_NAME[mode]} {tokens / tm['peer']:,.1f} tok/s", ratio(tm["peer"] / tm["ours"]))
        log.row(f"start-up to the first token, {args.shape}, {mode}, {how}", f"{ours_start:,.1f} s",
                f"llama.cpp {PEER_NAME[mode]} {peer_start:,.1f} s", ratio(peer_start / ours_start))
        if args.prompt:
            tp = interleaved({"ours": lambda: engine.generate([long_prompt], one),
                              "peer": lambda: llama_generate(llm, long_prompt, 1)}, rounds=1, warmup=0)
            print(f"{name:16} {args.prompt}-token prompt: ours {tp['ours']:6.1f} s, llama.cpp {tp['peer']:6.1f} s; "
                  f"peak RSS {rss_gb():.1f} GiB", flush=True)
            row["prompt_seconds"] = tp
            log.row(f"prompt of {args.prompt:,} tokens read + 1 answered, {args.shape}, {mode}, {how}",
                    f"{args.prompt / tp['ours']:,.0f} prompt tok/s",
                    f"llama.cpp {PEER_NAME[mode]} {args.prompt / tp['peer']:,.0f} prompt tok/s",
                    ratio(tp["peer"] / tp["ours"]))
        measured.append(row)
        engine.close()
        llm.close()
        del engine, llm
    log.write({"shape": args.shape, "params_b": round(params / 1e9, 3), "compiled": compile, "new_tokens": args.new,
               "prompt_tokens": 32, "long_prompt": args.prompt, "rounds": args.rounds, "threads": threads,
               "llama_cpp_python": llama_cpp.__version__, "peak_rss_gib": round(rss_gb(), 2), "modes": measured})


if __name__ == "__main__":
    main()
