"""The `apertus` command: parses arguments and calls the modules; no logic of its own."""

from __future__ import annotations

import argparse
import sys


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:,.1f} GiB"


def cmd_info(args) -> int:
    import torch

    from .checkpoint import load_model
    from .config import PRESETS, load_config, preset
    from .model import build_model

    cfg = preset(args.model) if args.model in PRESETS else load_config(args.model)
    model = build_model(cfg, device="meta")
    n, n_emb = model.num_params(), cfg.vocab_size * cfg.hidden_size
    print(f"{args.model}: Apertus, {n / 1e9:.2f}B parameters ({n:,}; {(n - n_emb) / 1e9:.2f}B without the input "
          f"embedding)")
    print(f"  layers {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}/"
          f"{cfg.num_key_value_heads} x {cfg.head_dim}, MLP {cfg.intermediate_size} (xIELU), vocab {cfg.vocab_size}")
    rope = (f"llama3 x{cfg.rope_scaling['factor']:g}" if cfg.rope_scaling else "default")
    print(f"  RoPE theta {cfg.rope_theta:,.0f} ({rope}), context {cfg.max_position_embeddings:,}")
    T = args.seq_len
    print(f"  FLOPs per token at seq {T}: {cfg.flops_per_token(T) / 1e9:,.1f} GFLOP training (6N + 12LHDT), "
          f"{cfg.flops_per_token(T, training=False) / 1e9:,.1f} GFLOP forward")
    print(f"  weights: {_gb(4 * n)} fp32, {_gb(2 * n)} bf16")
    # bf16 params + fp32 master + fp32 grads + AdEMAMix (m1, m2, nu in fp32); activations not included.
    print(f"  training state (bf16 params, fp32 master + grads, AdEMAMix m1/m2/nu): {_gb(22 * n)} "
          f"({_gb(20 * n)} with fp32 params; AdamW: {_gb(18 * n)}); activations extra")
    if args.load:
        m = load_model(args.model, dtype=torch.float32)
        print(f"  loaded: {m.num_params():,} parameters")
    return 0



# === tokenizer and chat format (issue 3) =============================================================================


def _load_tokenizer_spec(spec: str):
    """`apertus` (the released tokenizer) or a tokenizer.json / directory; `NAME=PATH` names it in reports."""
    from pathlib import Path

    from .tokenizer import Tokenizer, apertus_tokenizer_path

    name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
    file = apertus_tokenizer_path() if path == "apertus" else path
    return name or (path if path == "apertus" else Path(path).name or path), Tokenizer.from_file(file)


def cmd_tokenizer_apertus(args) -> int:
    from .chat import official_template
    from .tokenizer import APERTUS_SHA256, rebuild_apertus

    template = None if args.base else official_template()
    file = rebuild_apertus(args.out, chat_template=template)
    print(f"rebuilt {file} from mistral-common's tekken vocabulary: sha256 {APERTUS_SHA256} (the released file)")
    print(f"  config: {'base (BOS, no EOS)' if args.base else 'instruct (eos <|assistant_end|>, chat template)'}")
    return 0


def cmd_tokenizer_train(args) -> int:
    from .tokenizer import train_from_corpus

    # the Rust trainer draws its own progress bars; off a terminal it would only print blank lines
    tok, meta = train_from_corpus(args.corpus, args.vocab_size, args.out, min_frequency=args.min_frequency,
                                  max_bytes=int(args.max_mb * 1e6) if args.max_mb else None,
                                  progress=sys.stderr.isatty())
    print(f"trained a {tok.vocab_size:,}-token BPE on {meta['bytes'] / 1e6:.1f} MB ({meta['documents']:,} documents) "
          f"in {meta['seconds']:.1f} s -> {args.out} (sha256 {meta['tokenizer_sha256'][:16]}...)")
    return 0


def cmd_tokenizer_eval(args) -> int:
    from .tokenizer_eval import evaluate, iter_corpus, markdown

    texts: dict[str, str] = {}
    for spec in args.corpus:
        for lang, text in iter_corpus(spec):
            texts[lang] = texts[lang] + "\n" + text if lang in texts else text
    tokenizers = dict(_load_tokenizer_spec(s) for s in args.tokenizer)
    result = evaluate(tokenizers, texts, args.out)
    print(markdown(result).split("\n\n")[0])
    print(f"\n{len(texts)} languages; per-language table, JSON and chart in {args.out}/fertility.{{md,json,png}}")
    return 0


def _add_tokenizer_commands(sub) -> None:
    tk = sub.add_parser("tokenizer", help="the Apertus tokenizer: rebuild, train, evaluate")
    tsub = tk.add_subparsers(dest="tokenizer_command", required=True)
    s = tsub.add_parser("apertus", help="rebuild the released Apertus tokenizer from mistral-common and verify it")
    s.add_argument("--out", required=True, help="directory for tokenizer.json and tokenizer_config.json")
    s.add_argument("--base", action="store_true", help="base-model config (no chat template, eos </s>)")
    s.set_defaults(func=cmd_tokenizer_apertus)
    s = tsub.add_parser("train", help="train a byte-level BPE with the Apertus special-token layout")
    s.add_argument("--corpus", nargs="+", required=True,
                   help="udhr, flores, or .txt/.jsonl files or directories (jsonl rows need 'text')")
    s.add_argument("--vocab-size", type=int, required=True, help="total, including the 1000 reserved ids")
    s.add_argument("--out", required=True)
    s.add_argument("--min-frequency", type=int, default=2)
    s.add_argument("--max-mb", type=float, default=None, help="stop reading the corpus after this many MB")
    s.set_defaults(func=cmd_tokenizer_train)
    s = tsub.add_parser("eval", help="fertility per language and cross-language fairness, side by side")
    s.add_argument("--tokenizer", nargs="+", required=True,
                   help="apertus, or tokenizer.json files / directories; NAME=PATH names a column")
    s.add_argument("--corpus", nargs="+", default=["flores"], help="udhr, flores, or .txt/.jsonl files or directories")
    s.add_argument("--out", default="tokenizer_eval", help="directory for fertility.md/.json/.png")
    s.set_defaults(func=cmd_tokenizer_eval)


# === data pipeline (issue 4) =========================================================================================


def cmd_data_build(args) -> int:
    import time

    from .data.pipeline import build, funnel_table

    out = args.out or f"runs/data/{__import__('pathlib').Path(args.recipe).stem}"
    t = time.time()
    print(f"building {args.recipe} -> {out}")
    manifest = build(args.recipe, out, tasks=args.tasks, workers=args.workers, keep_work=args.keep_work)
    if manifest is None:
        return 0
    print(funnel_table(manifest))
    shards = manifest["shards"]
    print(f"{len(shards)} shard(s), {sum(s['n_tokens'] for s in shards):,} tokens, "
          f"{time.time() - t:.1f}s; manifest: {out}/manifest.json")
    return 0


def cmd_data_info(args) -> int:
    import json
    from pathlib import Path

    from .data.pipeline import funnel_table

    path = Path(args.dataset) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a built dataset")
    manifest = json.loads(path.read_text())
    print(funnel_table(manifest))
    for st in manifest["stages"]:
        print(f"stage {st['name']}: {st['sources']} tokens={st['tokens']}")
    return 0


def _add_data_commands(sub) -> None:
    d = sub.add_parser("data", help="the data pipeline: build tokenized shards from a recipe").add_subparsers(
        dest="data_command", required=True)
    s = d.add_parser("build", help="run a data recipe (TOML): sources -> filters -> dedup -> shards + manifest")
    s.add_argument("recipe", help="data recipe, e.g. recipes/data_tiny.toml")
    s.add_argument("--out", help="output directory (default runs/data/<recipe name>); re-running resumes")
    s.add_argument("--tasks", type=int, help="override [executor] tasks")
    s.add_argument("--workers", type=int, help="override [executor] workers (local processes)")
    s.add_argument("--keep-work", action="store_true", help="keep the intermediate files under <out>/work")
    s.set_defaults(func=cmd_data_build)
    s = d.add_parser("info", help="print the funnel and stages of a built dataset")
    s.add_argument("dataset")
    s.set_defaults(func=cmd_data_info)


# === pretraining and export (issue 5) ================================================================================


def _add_train_commands(sub) -> None:
    pass


# === inference: generate, chat (issue 6) =============================================================================


def _engine_from_args(args):
    from .infer import Engine

    return Engine(args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device, cache_gb=args.cache_gb,
                  quantize=args.quantize)


def _sampling_from_args(args, **extra):
    from .infer import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens,
                          **extra)


def cmd_generate(args) -> int:
    import time

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    with _engine_from_args(args) as engine:
        t = time.perf_counter()
        handle = engine.submit(prompt, _sampling_from_args(args, stop=args.stop or None))
        for delta in handle:
            print(delta.text, end="", flush=True)
        print()
        dt = time.perf_counter() - t
    n = len(handle.output_ids)
    print(f"[{n} tokens in {dt:.2f}s, {n / dt:.1f} tok/s, finish: {handle.finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .infer.repl import chat_loop

    with _engine_from_args(args) as engine:
        chat_loop(engine, _sampling_from_args(args), system=args.system, thinking=args.think)
    return 0


def _add_sampling_args(s, max_tokens: int) -> None:
    s.add_argument("model", help="checkpoint directory (or a preset name, random weights)")
    s.add_argument("--temperature", type=float, help="0 = greedy (default: generation_config.json, else 0.8)")
    s.add_argument("--top-p", type=float, help="nucleus sampling (default: generation_config.json, else 0.9)")
    s.add_argument("--top-k", type=int, help="0 = off")
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--repetition-penalty", type=float)
    s.add_argument("--max-tokens", type=int, default=max_tokens)
    s.add_argument("--seed", type=int, help="reproducible sampling")
    s.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the checkpoint's)")
    s.add_argument("--dtype", choices=["fp32", "bf16"], help="default: the checkpoint's (bf16 on GPU)")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--cache-gb", type=float, default=2.0, help="memory for the KV cache (GiB)")
    s.add_argument("--quantize", choices=["int8"], help="weight-only int8 (CPU, faster single-stream decoding)")


def _add_infer_commands(sub) -> None:
    s = sub.add_parser("generate", help="continue a prompt with a base model (streams the continuation)")
    _add_sampling_args(s, max_tokens=128)
    s.add_argument("--prompt", help="the text to continue (default: read stdin); BOS is added")
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="terminal chat with an instruct model (/reset, /think, /system, /quit)")
    _add_sampling_args(s, max_tokens=1024)
    s.add_argument("--system", help="system prompt (default: the Apertus one)")
    s.add_argument("--think", action="store_true", help="start with deliberation (reasoning) enabled")
    s.set_defaults(func=cmd_chat)


# === server (issue 7) ================================================================================================


def _add_serve_commands(sub) -> None:
    pass


# === post-training: sft, align (issue 8) =============================================================================


def _add_posttrain_commands(sub) -> None:
    pass


# === evaluation (issue 9) ============================================================================================

_EVAL_FORMS = """forms:
  apertus eval MODEL --tasks xcopa,piqa,flores_bpb ...   tasks; results as JSON + markdown table + PNG charts
  apertus eval memorization MODEL --probes PROBES ...    Goldfish audit: extraction of inserted probes
  apertus eval lm-eval-hook [--uninstall]                 let the `lm_eval` command find `--model apertus`"""


def cmd_eval(args) -> int:
    if args.target == "lm-eval-hook":
        from .eval.harness import install_hook

        files = install_hook(args.site_dir, uninstall=args.uninstall)
        print(("removed " if args.uninstall else "installed ") + ", ".join(map(str, files)))
        return 0
    if args.target == "memorization":
        from .eval.memorization import audit

        if not args.model or not args.probes:
            raise ValueError("usage: apertus eval memorization MODEL --probes PROBES")
        out = args.out or f"runs/eval/{_run_name(args.model)}/memorization"
        report = audit(args.model, args.probes, out=out, prefix=args.prefix, suffix=args.suffix, top_p=args.top_p,
                       seed=args.seed, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer)
        print(report["markdown"])
        print(f"written to {out}")
        return 0
    from .eval.report import markdown
    from .eval.suite import evaluate

    if args.model or not args.tasks:
        raise ValueError("usage: apertus eval MODEL --tasks TASKS (see apertus eval --help)")
    out = args.out or f"runs/eval/{_run_name(args.target)}"
    report = evaluate(args.target, _csv(args.tasks), out=out, limit=args.limit, langs=_csv(args.langs),
                      dtype=args.dtype, device=args.device, tokenizer=args.tokenizer, max_len=args.max_len,
                      batch_tokens=args.batch_tokens, bpb_stride=args.bpb_stride, chat=args.chat,
                      num_fewshot=args.num_fewshot, max_tokens=args.max_new_tokens)
    print(markdown(report))
    print(f"written to {out}")
    return 0


def _csv(s: str | None) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def _run_name(model: str) -> str:
    from pathlib import Path

    return Path(model).resolve().name or "model"


def _add_eval_commands(sub) -> None:
    s = sub.add_parser("eval", help="evaluate a checkpoint: tasks, memorization audit, lm-eval adapter",
                       epilog=_EVAL_FORMS, formatter_class=argparse.RawTextHelpFormatter)
    s.add_argument("target", help="checkpoint directory, or `memorization`, or `lm-eval-hook`")
    s.add_argument("model", nargs="?", help="checkpoint directory (after `memorization`)")
    s.add_argument("--out", help="report directory (default runs/eval/<model name>[/memorization])")
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    s.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    s.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's, else the Apertus tokenizer)")
    g = s.add_argument_group("tasks (apertus eval MODEL)")
    g.add_argument("--tasks", help="comma-separated groups (flores_bpb, udhr_bpb, xcopa, xwinograd, piqa, sib200, "
                   "gsm8k, mgsm) or subtasks GROUP_LANG (xcopa_it, sib200_deu_Latn)")
    g.add_argument("--langs", help="comma-separated language filter for multilingual groups (deu_Latn or deu, it)")
    g.add_argument("--limit", type=int, help="first N documents of each subtask")
    g.add_argument("--max-len", type=int, default=4096, help="longest input; longer texts are scored in windows")
    g.add_argument("--bpb-stride", type=int, help="tokens predicted per window of a long text (default max-len)")
    g.add_argument("--batch-tokens", type=int, default=8192, help="tokens per forward pass (padding included)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="chat format for generative tasks (default: if the checkpoint is an instruct one)")
    g.add_argument("--num-fewshot", type=int, default=8)
    g.add_argument("--max-new-tokens", type=int, default=384)
    g = s.add_argument_group("memorization (apertus eval memorization MODEL)")
    g.add_argument("--probes", help="probes JSONL, or a built dataset directory holding probes.jsonl")
    g.add_argument("--prefix", type=int, default=32, help="prompt length in tokens")
    g.add_argument("--suffix", type=int, default=32, help="continuation length in tokens")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling at temperature 1")
    g.add_argument("--seed", type=int, default=0)
    g = s.add_argument_group("lm-eval-hook (apertus eval lm-eval-hook)")
    g.add_argument("--uninstall", action="store_true")
    g.add_argument("--site-dir", help="default: this interpreter's site-packages")
    s.set_defaults(func=cmd_eval)


# === compliance: run manifests, cards, opt-out (issue 10) ============================================================


def _add_compliance_commands(sub) -> None:
    pass


# === speedrun and report (issue 11) ==================================================================================


def _add_speedrun_commands(sub) -> None:
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apertus", description="The Apertus LLM system, open end to end.")
    sub = p.add_subparsers(dest="command", required=True)

    # --- model -----------------------------------------------------------------------------------------------------
    s = sub.add_parser("info", help="parameters, FLOPs per token and memory of a preset or checkpoint")
    s.add_argument("model", help="preset name (tiny, apertus-8b, apertus-70b) or checkpoint directory")
    s.add_argument("--seq-len", type=int, default=4096)
    s.add_argument("--load", action="store_true", help="also load the weights (checks the checkpoint)")
    s.set_defaults(func=cmd_info)

    _add_tokenizer_commands(sub)
    _add_data_commands(sub)
    _add_train_commands(sub)
    _add_infer_commands(sub)
    _add_serve_commands(sub)
    _add_posttrain_commands(sub)
    _add_eval_commands(sub)
    _add_compliance_commands(sub)
    _add_speedrun_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"apertus {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"apertus {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
