"""Serving throughput: `apertus serve` vs `transformers serve`, same checkpoint, same streaming chat requests.

    python bench/server.py [--preset tiny] [--concurrency 1 8 32] [--new 64] [--requests 2] [--peer-cb]

Both servers run as their own processes on 127.0.0.1 and get the same workload from the official `openai` client
(async, streaming, include_usage): C clients each send --requests chat requests one after the other, each asking
for --new tokens at temperature 0 (ours with ignore_eos; the random model rarely stops early, and only the tokens
actually returned are counted). Reported per concurrency: requests/s, output tokens/s, median time to first token
(TTFT, request sent to first content chunk). Ours and the peer alternate (bench/_timing.py). A last column gives our
server's tokens/s over the raw engine's (`Engine.generate` on the same prompts in-process): the cost of HTTP, SSE
and the chat format. The model is the preset with random weights and a small tokenizer trained on the spot, saved
with the official chat template so transformers renders the same prompts. --peer-cb runs transformers with
--continuous-batching (slow to warm up on CPU). Ours runs with --compile (--no-compile: eager), as a server would.
The log (bench/_log.py) goes to bench/results/server-<preset>[-eager][-nopeer][-peer-cb].json
"""

import argparse
import asyncio
import dataclasses
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
from _log import BenchLog, ratio
from _timing import interleaved

from apertus import build_model, preset, save_model
from apertus.chat import encode_chat, official_template
from apertus.infer import Engine, SamplingParams
from apertus.tokenizer import tiny_tokenizer


def make_checkpoint(out: Path, preset_name: str, tok=None, **sizes) -> Path:
    """A random instruct checkpoint of the preset (`sizes`: config fields to change) with the official chat template,
    and `tok` (default: an 8k BPE)."""
    tok = tok or tiny_tokenizer(out / "tokenizer", vocab_size=8192)
    cfg = dataclasses.replace(preset(preset_name), vocab_size=tok.vocab_size, **sizes)
    model_dir = out / "model"
    tok.save(model_dir, chat_template=official_template())
    files = {f.name: f.read_text() for f in model_dir.iterdir()}
    save_model(build_model(cfg, seed=0), model_dir, extra_files=files)
    return model_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:3]} exited; see {log}")
        time.sleep(0.1)
    raise RuntimeError(f"{cmd[:3]} did not start; see {log}")


def workload(url: str, model: str, concurrency: int, per_client: int, new: int, extra: dict) -> dict:
    """C clients x per_client streaming chat requests; returns wall time, requests, tokens and TTFTs."""

    async def main():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900) as client:
            return await run(client)

    async def run(client):
        ttft, tokens = [], []

        async def one(k):
            t0, first, n = time.perf_counter(), None, 0
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Write a story about the number {k}."}],
                max_tokens=new, temperature=0, stream=True, stream_options={"include_usage": True},
                extra_body=extra)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter() - t0
                if chunk.usage:
                    n = chunk.usage.completion_tokens
            ttft.append(first if first is not None else time.perf_counter() - t0)
            tokens.append(n)

        async def client_loop(c):
            for r in range(per_client):
                await one(c * per_client + r)

        t = time.perf_counter()
        await asyncio.gather(*[client_loop(c) for c in range(concurrency)])
        return {"seconds": time.perf_counter() - t, "requests": len(tokens), "tokens": sum(tokens), "ttft": ttft}

    return asyncio.run(main())


def measure(c: int, args, engine, targets: dict, log: BenchLog) -> dict:
    """One row per server at concurrency c; the servers and the raw engine alternate."""
    results = {name: [] for name in targets}

    def run(name):
        return lambda: results[name].append(workload(*targets[name][:2], c, args.requests, args.new,
                                                      targets[name][2]))

    prompts = [encode_chat(engine.tokenizer, [{"role": "user", "content": f"Write a story about the number {k}."}],
                           add_generation_prompt=True)[0] for k in range(c)]
    greedy = SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True)
    t = interleaved({**{name: run(name) for name in targets}, "engine": lambda: engine.generate(prompts, greedy)},
                    rounds=args.rounds)
    engine_tps = c * args.new / t["engine"]
    rows = {}
    for name, runs in results.items():
        runs = runs[1:]  # without the warm-up
        med = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        rows[name] = (med["requests"] / med["seconds"], med["tokens"] / med["seconds"],
                      1000 * statistics.median(med["ttft"]))
    for name, (rps, tps, ttft) in rows.items():
        vs_peer = f"{tps / rows['peer'][1]:14.2f}x" if "peer" in rows and name == "ours" else " " * 15
        versus = f"{tps / engine_tps:10.2f}x" if name == "ours" else ""
        label = "apertus serve" if name == "ours" else "transformers"
        print(f"{c:7d} {label:>13} {rps:7.2f} {tps:8.1f} {ttft:8.0f}   {vs_peer} {versus}", flush=True)
    ours, peer = rows["ours"], rows.get("peer")
    how = f"{args.preset}, {args.new} new tokens, {'eager' if args.no_compile else '`--compile`'}"
    log.row(f"streaming chat, {c} client{'s' if c > 1 else ''}, {how}", f"{ours[1]:,.1f} tok/s",
            f"{peer_name(args)} {peer[1]:,.1f} tok/s" if peer else "", ratio(ours[1] / peer[1]) if peer else "")
    log.row(f"median time to first token, {c} client{'s' if c > 1 else ''}", f"{ours[2]:,.0f} ms",
            f"{peer_name(args)} {peer[2]:,.0f} ms" if peer else "", ratio(peer[2] / ours[2]) if peer else "")
    return {"clients": c, "engine_tok_s": engine_tps, **{name: {"requests_per_s": r[0], "tok_s": r[1], "ttft_ms": r[2]}
                                                           for name, r in rows.items()}}


def peer_name(args) -> str:
    return f"`transformers serve{' --continuous-batching' if args.peer_cb else ''}`"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--peer-cb", action="store_true", help="transformers serve --continuous-batching")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="our server without --compile")
    args = ap.parse_args()
    log = BenchLog("server", [args.preset, "eager" if args.no_compile else "", "nopeer" if args.no_peer else "",
                              "peer-cb" if args.peer_cb else ""])

    work = Path(tempfile.mkdtemp(prefix="bench-server-"))
    model_dir = make_checkpoint(work, args.preset)
    ours_port, peer_port = free_port(), free_port()
    servers = []
    try:  # a server that fails to start must not leave the other one running
        servers.append(start([sys.executable, "-m", "apertus.cli", "serve", str(model_dir), "--port", str(ours_port),
                              "--served-model-name", "bench", "--log-level", "warning", "--max-batch",
                              str(max(args.concurrency)), *([] if args.no_compile else ["--compile"])], ours_port,
                             work / "ours.log"))
        targets = {"ours": (f"http://127.0.0.1:{ours_port}", "bench", {"ignore_eos": True})}
        if not args.no_peer:
            servers.append(start([str(Path(sys.executable).with_name("transformers")), "serve", str(model_dir),
                                  "--host", "127.0.0.1", "--port", str(peer_port), "--log-level", "warning",
                                  *(["--continuous-batching"] if args.peer_cb else [])], peer_port,
                                 work / "peer.log"))
            targets["peer"] = (f"http://127.0.0.1:{peer_port}", str(model_dir), {})
        run_all(args, model_dir, targets, log)
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait(30)


def run_all(args, model_dir: Path, targets: dict, log: BenchLog) -> None:
    """Every concurrency against the running servers and the in-process engine, then the log."""
    engine = Engine(model_dir, max_batch=max(args.concurrency), compile=not args.no_compile)
    print(f"streaming chat, {args.preset} ({engine.model.num_params() / 1e6:.1f}M params, random weights, vocab "
          f"{engine.config.vocab_size}), cpu {os.cpu_count()} cores, {args.new} new tokens, {args.requests} "
          f"requests per client; peer: transformers serve{' --continuous-batching' if args.peer_cb else ''}")
    print(f"{'clients':>7} {'':>13} {'req/s':>7} {'tok/s':>8} {'TTFT ms':>8}   {'ours/peer tok/s':>15} "
          f"{'ours/engine':>11}")
    try:
        measured = [measure(c, args, engine, targets, log) for c in args.concurrency]
    finally:
        engine.close()
    log.write({"preset": args.preset, "new_tokens": args.new, "requests_per_client": args.requests,
               "rounds": args.rounds, "compiled": not args.no_compile, "peer": None if args.no_peer else
               peer_name(args).strip("`"), "concurrency": measured})


if __name__ == "__main__":
    main()
