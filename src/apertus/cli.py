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
    from .compliance.manifest import record_data_build

    record_data_build(out, wall_time=time.time() - t)
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


def cmd_train(args) -> int:
    if args.nproc > 1 and not args.dry_run:  # one process per device under torchrun (gloo on CPU, NCCL on GPUs)
        import subprocess

        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                "-m", "apertus.train", args.recipe] + _train_argv(args)
        return subprocess.call(argv)
    from .train.pretrain import main

    return main([args.recipe] + _train_argv(args) + (["--gpus", str(args.gpus or args.nproc)] if args.dry_run else []))


def _train_argv(args) -> list[str]:
    argv = ["--out", args.out] if args.out else []
    for item in args.set:
        argv += ["--set", item]
    return argv + (["--dry-run", "--gpu-memory", str(args.gpu_memory)] if args.dry_run else [])


def cmd_export(args) -> int:
    from .train import checkpointing as ck

    if args.format == "hf" and args.dtype == "f16":
        raise ValueError("--dtype f16 is for --format gguf; a Hugging Face export is bf16 or fp32")
    out = args.out or ck.default_export_path(args.checkpoint, args.format, args.dtype)
    if args.format == "gguf":
        out = ck.export_checkpoint_gguf(args.checkpoint, out, dtype=args.dtype, tokenizer=args.tokenizer)
        print(f"wrote {out} (GGUF for llama.cpp, {args.dtype})")
    else:
        out = ck.export_checkpoint(args.checkpoint, out, dtype=args.dtype, tokenizer=args.tokenizer)
        print(f"wrote {out} (Hugging Face Apertus checkpoint, {args.dtype})")
    return 0


def _add_train_commands(sub) -> None:
    s = sub.add_parser("train", help="pretrain from a TOML recipe (resumes from the newest checkpoint in --out)")
    s.add_argument("recipe", help="TOML recipe, e.g. recipes/tiny.toml")
    s.add_argument("--nproc", type=int, default=1, help="processes (devices) on this machine, via torchrun")
    s.add_argument("--out", help="run directory (default runs/<recipe name>)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set train.steps=100 (repeatable)")
    s.add_argument("--dry-run", action="store_true", help="validate the recipe and print the plan (steps, tokens, "
                   "FLOPs, memory per GPU); train nothing")
    s.add_argument("--gpus", type=int, help="GPU count the plan is made for (default --nproc)")
    s.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU the plan checks against")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("export", help="write a training checkpoint as a Hugging Face Apertus checkpoint or GGUF")
    s.add_argument("checkpoint", help="checkpoint folder (runs/X/checkpoints/step_N), or a run folder (newest)")
    s.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="hf: a directory transformers loads; gguf: one file llama.cpp loads")
    s.add_argument("--out", help="output directory (hf) or .gguf file (default: RUN/export/...)")
    s.add_argument("--dtype", choices=["bf16", "fp32", "f16"], default="bf16", help="weights (f16: gguf only)")
    s.add_argument("--tokenizer", help="tokenizer.json to include (default: the run's tokenizer/)")
    s.set_defaults(func=cmd_export)


# === inference: generate, chat (issue 6) =============================================================================


def _pii_filter_factory(args):
    """The PII output filter of issue 10 (off by default): a factory of one streaming filter per reply."""
    if not (args.pii_filter or args.pii_hash_list):
        return None
    from .compliance.output_filter import PIIFilter, load_hash_list

    hash_list = load_hash_list(args.pii_hash_list) if args.pii_hash_list else None
    return lambda: PIIFilter(hash_list=hash_list)


def _add_pii_arguments(s) -> None:
    s.add_argument("--pii-filter", action="store_true", help="redact e-mails, IBANs, cards, IPs, phones in the output")
    s.add_argument("--pii-hash-list", help="also redact the removal requests of this salted hash list (implies "
                   "--pii-filter)")


def _engine_from_args(args):
    from .infer import Engine

    return Engine(args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device, cache_gb=args.cache_gb,
                  quantize=args.quantize, compile=args.compile, output_filter=_pii_filter_factory(args))


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


_COMPILE_HELP = "run the engine through torch.compile: 2-3x faster decoding steps after 20-45 s of compiling at start"


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
    s.add_argument("--compile", action="store_true", help=_COMPILE_HELP)
    _add_pii_arguments(s)


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


def cmd_serve(args) -> int:
    import os

    from .infer.server import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("APERTUS_API_KEY"),
          model_name=args.served_model_name, max_body_mb=args.max_body_mb, output_filter=_pii_filter_factory(args),
          log_level=args.log_level, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
          cache_gb=args.cache_gb, max_batch=args.max_batch, max_queue=args.max_queue, quantize=args.quantize,
          compile=args.compile, prefix_caching=args.prefix_caching)
    return 0


def _add_serve_commands(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible server and web chat (http://127.0.0.1:8000/)")
    s.add_argument("model", help="checkpoint directory (or a preset name, random weights)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="clients must send 'Authorization: Bearer KEY' (default: $APERTUS_API_KEY)")
    s.add_argument("--served-model-name", help="the model id clients use (default: the directory name)")
    s.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the checkpoint's)")
    s.add_argument("--dtype", choices=["fp32", "bf16"], help="default: the checkpoint's (bf16 on GPU)")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--cache-gb", type=float, default=2.0, help="memory for the KV cache (GiB)")
    s.add_argument("--max-batch", type=int, default=64, help="requests decoded together")
    s.add_argument("--max-queue", type=int, default=256, help="requests waiting; more are answered 503")
    s.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body (MiB); larger: 413")
    s.add_argument("--quantize", choices=["int8"], help="weight-only int8 (CPU)")
    s.add_argument("--compile", action="store_true", help=_COMPILE_HELP)
    s.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV cache of prompts that start alike (default: on; --no-prefix-caching: off)")
    _add_pii_arguments(s)
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)


# === post-training: sft, align (issue 8) =============================================================================


def _posttrain(args, kind: str) -> int:
    """SFT or alignment from a recipe; several processes (devices) run under torchrun (gloo on CPU, NCCL on GPUs)."""
    argv = [args.recipe] + (["--out", args.out] if args.out else [])
    for item in args.set:
        argv += ["--set", item]
    if args.nproc > 1:
        import subprocess

        module = "apertus.train.sft" if kind == "sft" else "apertus.train.qrpo"
        return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc-per-node={args.nproc}", "-m", module] + argv)
    from .train.sft import main

    return main(argv, kind=kind)


def cmd_sft(args) -> int:
    return _posttrain(args, "sft")


def cmd_align(args) -> int:
    return _posttrain(args, "align")


def _add_posttrain_commands(sub) -> None:
    for name, func, text, example in (
            ("sft", cmd_sft, "supervised fine-tuning on chat data (Apertus chat format, loss on assistant tokens)",
             "recipes/sft_tiny.toml"),
            ("align", cmd_align, "preference alignment: QRPO (or length-normalised DPO) on rewarded reference samples",
             "recipes/align_tiny.toml")):
        s = sub.add_parser(name, help=text + "; resumes from --out")
        s.add_argument("recipe", help=f"TOML recipe, e.g. {example}")
        s.add_argument("--out", help="run directory (default runs/<recipe name>); an existing run resumes")
        s.add_argument("--nproc", type=int, default=1, help="processes (devices) on this machine, via torchrun")
        s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a recipe value, e.g. --set train.epochs=2 (repeatable)")
        s.set_defaults(func=func)


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


def cmd_verify(args) -> int:
    from .compliance.manifest import verify

    result = verify(args.run_dir)
    for p in result["problems"]:
        print(f"MISMATCH {p['path']}: {p['problem']}")
    n = len(result["problems"])
    print(f"{args.run_dir}: {result['checked']} files checked, " + (f"{n} problem(s)" if n else "all hashes match"))
    return 1 if n else 0


def cmd_manifest(args) -> int:
    from .compliance.manifest import record

    m = record(args.run_dir, args.kind)
    print(f"wrote {args.run_dir}/run.json ({m['kind']}: {len(m['artifacts'])} artifacts hashed, "
          f"tokens {m['tokens']}, energy estimate {m['energy']['kwh'] if m['energy'] else '-'} kWh)")
    return 0


def cmd_card(args) -> int:
    from .compliance.cards import write_cards

    files = write_cards(args.run_dir, args.out, model_name=args.name, provider=args.provider, license_=args.license)
    for path in files.values():
        print(f"wrote {path}")
    return 0


def cmd_optout_apply(args) -> int:
    from .compliance.optout import apply_optout, read_list

    rep = apply_optout(args.dataset, robots=args.robots, urls=read_list(args.urls), domains=read_list(args.domains),
                       text_hashes=read_list(args.text_hashes), dry_run=args.dry_run)
    r = rep["removed"]
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {r['docs']:,} document(s), {r['tokens']:,} tokens; reasons {rep['by_reason']}; shards rebuilt "
          f"{len(rep['shards_rebuilt'])}, untouched {rep['shards_untouched']}")
    for key, vals in rep["unmatched_requests"].items():
        if vals:
            print(f"  {len(vals)} of the {key} matched no document (not in this dataset)")
    if not args.dry_run:
        print(f"report: {args.dataset}/optout/removal-{rep['time']}.json")
    return 0


def cmd_optout_check(args) -> int:
    import json

    from .compliance.optout import check

    res = check(args.dataset, args.query)
    if args.json:
        print(json.dumps(res, indent=1, ensure_ascii=False))
        return 0 if res["found"] else 1
    if not res["found"]:
        print(f"not in {args.dataset} ({res['kind']})")
    for d in res["documents"]:
        where = f"stages {', '.join(d['stages'])}" if d["stages"] else "held out (validation split, not trained on)"
        print(f"FOUND {d['match']}: document {d['id']} ({d['source']}, {d['language']}, {d['split']}) in "
              f"{d['shard']} at token {d['offset']:,}; {where}")
    if res["n_documents"] > len(res["documents"]):
        print(f"... {res['n_documents'] - len(res['documents'])} more")
    for r in res["removed_before"]:
        print(f"REMOVED earlier: document {r['id']} ({', '.join(r['reasons'])}), report {r['report']}")
    return 0 if res["found"] else 1


def cmd_redact(args) -> int:
    from .compliance.output_filter import PIIFilter, write_hash_list

    if args.make_hash_list:
        if not args.out:
            raise ValueError("--make-hash-list needs --out FILE")
        hl = write_hash_list(args.make_hash_list, args.out)
        print(f"wrote {args.out}: {len(hl['hashes'])} salted hashes (up to {hl['max_words']} words)")
        return 0
    filt = PIIFilter(args.kinds, args.hash_list)
    while chunk := sys.stdin.read(args.chunk) if args.chunk else sys.stdin.readline():
        sys.stdout.write(filt.feed(chunk))
        sys.stdout.flush()
    sys.stdout.write(filt.flush())
    print(f"[redacted: {filt.counts}]", file=sys.stderr)
    return 0


def _add_compliance_commands(sub) -> None:
    s = sub.add_parser("verify", help="re-hash every artifact of a run (shards, index, checkpoints) against run.json")
    s.add_argument("run_dir", help="a run folder with run.json, or a built dataset")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("manifest", help="write run.json for a finished data build or training run")
    s.add_argument("run_dir")
    s.add_argument("--kind", help="pretrain, sft, align (training runs; default pretrain)")
    s.set_defaults(func=cmd_manifest)

    s = sub.add_parser("card", help="model card, data card and EU AI Act public summary from the run manifests")
    s.add_argument("run_dir", help="a run folder (its run.json and those one or two folders down are read)")
    s.add_argument("--out", help="output folder (default RUN_DIR/card)")
    s.add_argument("--name", help="model name (default apertus-<folder name>)")
    s.add_argument("--provider", help="provider name and contact for the public summary")
    s.add_argument("--license", default="Apache-2.0")
    s.set_defaults(func=cmd_card)

    o = sub.add_parser("optout", help="retrospective removal from a built dataset; was X in the training data?")
    osub = o.add_subparsers(dest="optout_command", required=True)
    s = osub.add_parser("apply", help="remove opted-out or requested documents, rebuilding only the affected shards")
    s.add_argument("dataset")
    s.add_argument("--robots", help="robots.txt snapshots: folder of <host>.txt or JSONL {domain, robots_txt}")
    s.add_argument("--urls", help="file of URLs to remove, one per line")
    s.add_argument("--domains", help="file of domains to remove (subdomains included), one per line")
    s.add_argument("--text-hashes", help="file of sha256 hex digests of document texts, one per line")
    s.add_argument("--dry-run", action="store_true", help="report what would be removed; change nothing")
    s.set_defaults(func=cmd_optout_apply)
    s = osub.add_parser("check", help="whether and where a URL, text sha256 or text is in the dataset (exit 1: no)")
    s.add_argument("dataset")
    s.add_argument("query", help="a URL, a sha256 of a document's text, or a text (also found inside documents)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_optout_check)

    s = sub.add_parser("redact", help="PII output filter: stdin -> stdout, streaming; or make a hashed removal list")
    s.add_argument("--hash-list", help="salted hash list of removal requests (JSON)")
    s.add_argument("--kinds", nargs="+", help="subset of: email iban card ip phone (default all)")
    s.add_argument("--chunk", type=int, default=0, help="read this many characters at a time (default: lines)")
    s.add_argument("--make-hash-list", metavar="REQUESTS", help="text file, one request per line -> --out JSON")
    s.add_argument("--out")
    s.set_defaults(func=cmd_redact)


# === speedrun and report (issue 11) ==================================================================================


def cmd_speedrun(args) -> int:
    from .speedrun import speedrun

    try:
        speedrun(args.out, smoke=args.smoke, tokenizer=args.tokenizer, stages=_csv(args.stages))
    except RuntimeError as e:  # a stage stopped early (SIGTERM) or a command failed: rerunning resumes
        print(f"apertus speedrun: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from .speedrun_report import write_report

    print(f"wrote {write_report(args.run_dir)}")
    return 0


def _add_speedrun_commands(sub) -> None:
    s = sub.add_parser("speedrun", help="the whole pipeline on the embedded corpus (data, tokenizer, pretraining, "
                       "SFT, QRPO, eval, export, cards, chat) and report.md; resumes")
    s.add_argument("--out", default="runs/demo", help="run directory (default runs/demo); a rerun resumes")
    s.add_argument("--smoke", action="store_true", help="a few steps per stage (CI; about two minutes)")
    s.add_argument("--tokenizer", choices=["train", "apertus"], default="train",
                   help="train a small BPE on the corpus (default) or use the released Apertus tokenizer (slower)")
    s.add_argument("--stages", help="comma-separated stages to (re)run: tokenizer, data, pretrain, sft, align, "
                   "eval, export, cards, chat (default: every stage not done yet)")
    s.set_defaults(func=cmd_speedrun)

    s = sub.add_parser("report", help="(re)write report.md of a speedrun directory")
    s.add_argument("run_dir")
    s.set_defaults(func=cmd_report)


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
