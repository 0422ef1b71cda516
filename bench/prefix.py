"""Prefix caching on vs off: the same `apertus serve` with and without `--no-prefix-caching`, and the engine for
QRPO-style rollouts.

    python bench/prefix.py [--preset tiny] [--clients 32] [--turns 10] [--rounds 1] [--new 16] [--compile]
    python bench/prefix.py --width 768 --depth 12 --workloads chat    # a 152M model (GPT-2 small's shape)

Three workloads, on and off alternating (bench/_timing.py's idea: machine noise hits both), after one short
request to each server as a warm-up:
- chat: one client, a --turns-turn conversation that re-sends the whole history each turn (the Apertus default
  system prompt, ~80-token user messages, --new-token replies); time to first token (TTFT) per turn.
- shared: --clients clients at once, each a chat request with the default system prompt, the same ~1,400-token
  tool list and its own question, 4 new tokens each; TTFT p50 / p95 and requests/s.
- rollouts: n=8 seeded samples of each of 4 chat prompts through `Engine.generate` (what QRPO does), --new tokens
  each; seconds, and whether the samples are the same with and without.
Every round uses new user messages, so what is cached is what production would have cached: the system prompt and
tool list every request shares, and the history of the chat at hand. The model is the preset with random weights
and the real Apertus tokenizer (so token counts are the real ones), served as streaming chat through the official
openai client (async). --width/--depth change the preset's hidden size and layers (64-wide heads, 3 query heads per
KV head, MLP 4x wide): at the tiny preset a request's fixed costs (HTTP, template, the 131k-wide output layer) are
most of the time to first token; at a larger width the prompt's prefill is, as with the models people serve. The log
goes to bench/results/prefix-<preset>[-<width>x<depth>][-compile].json (bench/_log.py).
"""

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai
from _log import BenchLog, ratio
from server import free_port, make_checkpoint, start

from apertus.chat import encode_chat
from apertus.infer import Engine, SamplingParams
from apertus.tokenizer import Tokenizer, apertus_tokenizer_path

WORDS = ("canton federal council railway glacier referendum language data model training open weights village "
         "mountain lake cheese watch bank neutral research science students university multilingual compliance "
         "privacy opt-out token budget schedule report summary please explain detail example").split()


def tool(name: str, what: str, params: dict) -> dict:
    props = {k: {"type": "string", "description": v} for k, v in params.items()}
    return {"type": "function", "function": {"name": name, "description": what, "parameters": {
        "type": "object", "properties": props, "required": list(params)[:1]}}}


TOOLS = [tool(f"{verb}_{thing}", f"{verb.capitalize()} the {thing} named by the user. Use it only when the user "
              f"asks about a {thing}; answer in the user's language and cite the source.",
              {"id": f"the {thing}'s identifier", "language": "ISO 639-1 code of the answer",
               "since": "ISO date, optional", "limit": "how many results at most (default 10)"})
         for verb in ("search", "get", "summarize", "translate") for thing in ("document", "timetable", "law",
                                                                              "weather")]


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def ask(client, messages, new: int, tools=None) -> tuple[float, str, int]:
    """One streaming chat request: (TTFT, reply text, output tokens)."""
    t0, first, reply, n = time.perf_counter(), None, "", 0
    stream = await client.chat.completions.create(
        model="bench", messages=messages, tools=tools or openai.NOT_GIVEN, max_tokens=new, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices:
            d = chunk.choices[0].delta
            piece = (d.content or "") + (getattr(d, "reasoning_content", None) or "")
            if (piece or d.tool_calls) and first is None:
                first = time.perf_counter() - t0
            reply += d.content or ""
        if chunk.usage:
            n = chunk.usage.completion_tokens
    return (first if first is not None else time.perf_counter() - t0), reply, n


def chat_round(url: str, turns: int, seed: int, new: int) -> list[float]:
    """TTFT of each turn of one conversation that re-sends its history."""
    async def run():
        rng = random.Random(seed)
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900) as client:
            messages, ttfts = [], []
            for _ in range(turns):
                messages.append({"role": "user", "content": text(rng, 60)})
                ttft, reply, _ = await ask(client, messages, new)
                messages.append({"role": "assistant", "content": reply or "ok"})
                ttfts.append(ttft)
            return ttfts

    return asyncio.run(run())


def shared_round(url: str, clients: int, seed: int) -> dict:
    """`clients` requests at once sharing the system prompt and tool list."""
    async def run():
        rng = random.Random(seed)
        questions = [text(rng, 30) for _ in range(clients)]
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900) as client:
            t = time.perf_counter()
            out = await asyncio.gather(*[ask(client, [{"role": "user", "content": q}], 4, TOOLS) for q in questions])
            return {"seconds": time.perf_counter() - t, "ttft": [o[0] for o in out], "tokens": sum(o[2] for o in out)}

    return asyncio.run(run())


def p(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def rollouts(model_dir: Path, args) -> dict:
    """n=8 seeded samples of each of 4 prompts through Engine.generate, on vs off, alternating."""
    engines = {k: Engine(model_dir, max_batch=64, compile=args.compile, prefix_caching=k == "on")
               for k in ("on", "off")}
    tok, rng = engines["on"].tokenizer, random.Random(0)
    prompts = [encode_chat(tok, [{"role": "user", "content": text(rng, 120)}], add_generation_prompt=True)[0]
               for _ in range(4)]
    times, samples, same = {"on": [], "off": []}, {}, []
    try:
        for r in range(args.rounds):
            params = [SamplingParams(temperature=1.0, seed=1000 * r + i, max_tokens=args.new, ignore_eos=True)
                      for i in range(32)]
            for k, engine in engines.items():
                t = time.perf_counter()
                out = engine.generate([q for q in prompts for _ in range(8)], params)
                times[k].append(time.perf_counter() - t)
                samples[k] = [o.output_ids for o in out]
            # not asserted equal: on a random model's near-flat distribution over 131k tokens, float noise of
            # 1e-6 (cached pages computed in another batch, as batching gives) moves a draw to a neighbour
            same.append(statistics.mean(a == b for a, b in zip(samples["on"], samples["off"], strict=True)))
    finally:
        for engine in engines.values():
            engine.close()
    sec = {k: statistics.median(v) for k, v in times.items()}
    return {"prompt_tokens": [len(q) for q in prompts], "n": 8, "new_tokens": args.new, "seconds": sec,
            "speedup": sec["off"] / sec["on"], "same_samples": statistics.mean(same)}


WORKLOADS = ("chat", "shared", "rollouts")


def table_rows(log: BenchLog, r: dict) -> None:
    """The README rows of a prefix result."""
    how = "`--compile`" if r["compile"] else "eager"
    model = r.get("model", r["preset"])
    if "chat" in r:
        chat = r["chat"]["turn_ttft_ms"]
        turns = len(chat["on"])
        log.row(f"{turns}-turn chat, time to first token at turn {turns} (60-word messages, {r['new_tokens']}-token "
                f"replies), {model}, {how}, prefix caching on vs off", f"{chat['on'][-1]:,.0f} ms",
                f"same server, `--no-prefix-caching` {chat['off'][-1]:,.0f} ms",
                ratio(chat["off"][-1] / chat["on"][-1]))
    if "shared" in r:
        sh = r["shared"]
        on, off = sh["on"], sh["off"]
        log.row(f"{sh['clients']} clients, default system prompt + tool list ({sh['prompt_tokens']:,} tokens), "
                f"{model}: TTFT p50 / p95, requests/s",
                f"{on['ttft_p50_ms'] / 1000:.1f} / {on['ttft_p95_ms'] / 1000:.1f} s, {on['requests_per_s']:.2f} req/s",
                f"`--no-prefix-caching` {off['ttft_p50_ms'] / 1000:.1f} / {off['ttft_p95_ms'] / 1000:.1f} s, "
                f"{off['requests_per_s']:.2f} req/s",
                " / ".join(ratio(x) for x in (off["ttft_p50_ms"] / on["ttft_p50_ms"],
                                              off["ttft_p95_ms"] / on["ttft_p95_ms"],
                                              on["requests_per_s"] / off["requests_per_s"])))
    if "rollouts" in r:
        roll = r["rollouts"]
        log.row(f"QRPO-style rollouts, n={roll['n']} samples × {len(roll['prompt_tokens'])} prompts "
                f"(~{round(statistics.mean(roll['prompt_tokens']))} tokens), {roll['new_tokens']} new tokens, {model}",
                f"{roll['seconds']['on']:,.1f} s", f"prefix caching off {roll['seconds']['off']:,.1f} s",
                ratio(roll["speedup"]))


def sizes(width: int | None, depth: int | None) -> dict:
    """Config fields for --width/--depth: 64-wide heads, 3 query heads per KV head, MLP 4x wide."""
    out = {}
    if width:
        heads = width // 64
        out |= dict(hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads,
                    num_key_value_heads=max(1, heads // 3))
    if depth:
        out["num_hidden_layers"] = depth
    return out


def serve_workloads(model_dir: Path, args) -> dict:
    """The chat and shared workloads against two servers, prefix caching on and off, alternating."""
    urls, procs = {}, []
    for k in ("on", "off"):
        port = free_port()
        procs.append(start([sys.executable, "-m", "apertus.cli", "serve", str(model_dir), "--port", str(port),
                            "--served-model-name", "bench", "--log-level", "warning", "--max-batch", str(args.clients),
                            *(["--compile"] if args.compile else []), *(["--no-prefix-caching"] if k == "off" else [])],
                           port, model_dir.parent / f"{k}.log"))
        urls[k] = f"http://127.0.0.1:{port}"
    try:
        turns = {k: [] for k in urls}
        shared = {k: [] for k in urls}
        for url in urls.values():  # first requests (and, with --compile, the graphs) warm up
            chat_round(url, 1, seed=-1, new=2)
        for r in range(args.rounds):
            for k, url in urls.items():
                if "chat" in args.workloads:
                    turns[k].append(chat_round(url, args.turns, seed=r, new=args.new))
                if "shared" in args.workloads:
                    shared[k].append(shared_round(url, args.clients, seed=100 + r))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    out = {}
    if "chat" in args.workloads:
        chat = {k: [statistics.median(run[i] for run in v) * 1000 for i in range(args.turns)] for k, v in turns.items()}
        out["chat"] = {"turn_ttft_ms": chat, "last_turn_speedup": chat["off"][-1] / chat["on"][-1]}
    if "shared" in args.workloads:
        share = {k: {"ttft_p50_ms": 1000 * p([x for s in v for x in s["ttft"]], 0.5),
                     "ttft_p95_ms": 1000 * p([x for s in v for x in s["ttft"]], 0.95),
                     "tokens_per_s": statistics.median(s["tokens"] / s["seconds"] for s in v),
                     "requests_per_s": statistics.median(args.clients / s["seconds"] for s in v)}
                 for k, v in shared.items()}
        out["shared"] = {"clients": args.clients, **share,
                         "ttft_p50_speedup": share["off"]["ttft_p50_ms"] / share["on"]["ttft_p50_ms"],
                         "throughput_speedup": share["on"]["tokens_per_s"] / share["off"]["tokens_per_s"]}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--width", type=int, help="hidden size instead of the preset's")
    ap.add_argument("--depth", type=int, help="layers instead of the preset's")
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1, help="measured rounds per workload")
    ap.add_argument("--new", type=int, default=16, help="tokens per chat reply and per rollout")
    ap.add_argument("--compile", action="store_true", help="servers and engines with torch.compile")
    ap.add_argument("--out", help="results folder (default bench/results)")
    args = ap.parse_args()
    shape = f"{args.width or ''}x{args.depth or ''}" if args.width or args.depth else ""
    log = BenchLog("prefix", [args.preset, shape, "compile" if args.compile else ""], out=args.out)
    work = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    model_dir = make_checkpoint(work, args.preset, Tokenizer.from_file(apertus_tokenizer_path()),
                                **sizes(args.width, args.depth))
    result = serve_workloads(model_dir, args) if {"chat", "shared"} & set(args.workloads) else {}
    if "rollouts" in args.workloads:
        result["rollouts"] = rollouts(model_dir, args)
    engine = Engine(model_dir, cache_gb=0.01)
    if "shared" in result:
        result["shared"]["prompt_tokens"] = len(encode_chat(engine.tokenizer, [{"role": "user", "content": "x"}],
                                                            tools=TOOLS, add_generation_prompt=True)[0])
    params_m = round(engine.model.num_params() / 1e6)
    engine.close()
    result |= {"preset": args.preset, "model": f"{args.preset} ({params_m}M)" if not shape else
               f"{args.width or args.preset}-wide {args.depth or args.preset} layers ({params_m}M)",
               "params_m": params_m, "compile": args.compile, "cpu_cores": os.cpu_count(),
               "rounds_measured": args.rounds, "new_tokens": args.new}
    table_rows(log, result)
    print("\n".join(f"{row['benchmark']}: {row['apertus']} vs {row['peer']} ({row['ratio']})" for row in log.rows))
    if "chat" in result:
        chat = result["chat"]["turn_ttft_ms"]
        print(f"chat TTFT per turn (ms), on: {[round(x) for x in chat['on']]}\n"
              f"                        off: {[round(x) for x in chat['off']]}")
    log.write(result)


if __name__ == "__main__":
    main()
