"""The `apertus` command: the argument parser, and for each sub-command a few lines that call the module doing the work.

Errors a user can fix (ValueError, FileNotFoundError, NotADirectoryError) end the command with one line on stderr and
exit status 2, as argparse does for bad arguments. The training commands (train, sft, align) with --nproc N start
themselves again as N processes through `apertus.train.distributed.launch` (torchrun), which reparses
`args.entry`, the command line this parser read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# These are light or loaded for the parser anyway (the engine's and the trainers' defaults). The modules that load
# datatrove, lm-eval or the web server (about half a second each) are imported by their own command's handler.
from . import chat, checkpoint, speedrun, speedrun_report, tokenizer, tokenizer_eval
from .cli_args import add_options, csv, defaults_of, forward, picked, printed
from .compliance import cards, manifest
from .eval import memorization, report, suite
from .infer import Engine, SamplingParams, repl
from .infer.engine import print_start_info
from .train import checkpointing, posttrain, pretrain, qrpo, recipe, sft

MODEL_HELP = "checkpoint directory or hub id org/name[@revision] (or a preset name, random weights)"
COMPILE_HELP = ("run the engine through torch.compile: 2-3x faster decoding steps after 20-45 s of compiling at start "
                "(less from the cache in $APERTUS_COMPILE_CACHE, default ~/.cache/apertus/inductor)")

# Options forwarded to a callee, by parameter name: argparse keywords without the default, which `add_options` reads
# from the callee's signature (or dataclass fields), so that the CLI and the Python API agree. A new engine or sampling
# option is one entry here.
MODEL_LOADING = {
    "tokenizer": dict(help="tokenizer.json or its directory (default: the checkpoint's)"),
    "dtype": dict(choices=["fp32", "bf16"], help="weights"),
    "device": dict(help="cpu, cuda, cuda:1 (default: cuda when available)"),
}
ENGINE = {
    **MODEL_LOADING,
    "dtype": dict(choices=["fp32", "bf16"], help="weights (default: the checkpoint's, bf16 on GPU)"),
    "cache_gb": dict(type=float, help="memory for the KV cache (GiB)"),
    "quantize": dict(choices=["int8", "int4"], help="weight-only int8 or int4 (CPU, faster single-stream decoding)"),
    "compile": dict(action="store_true", help=COMPILE_HELP),
}
SERVER_ENGINE = {
    "prefix_caching": dict(action=argparse.BooleanOptionalAction,
                           help="reuse the KV cache of prompts that start alike (--no-prefix-caching: off)"),
    "max_batch": dict(type=int, help="requests decoded together"),
    "max_queue": dict(type=int, help="requests waiting; more are answered 503"),
}
SAMPLING = {
    "temperature": dict(type=float, help="0 = greedy (default: generation_config.json, else 0.8)"),
    "top_p": dict(type=float, help="nucleus sampling (default: generation_config.json, else 0.9)"),
    "top_k": dict(type=int, help="0 = off"),
    "min_p": dict(type=float),
    "repetition_penalty": dict(type=float),
    "max_tokens": dict(type=int),
    "seed": dict(type=int, help="reproducible sampling"),
}


def run_name(model: str) -> str:
    return Path(model).resolve().name or "model"


# --- model and tokenizer ---------------------------------------------------------------------------------------------

def cmd_info(args) -> int:
    print(forward(recipe.model_info, args))
    if args.load:
        print(f"  loaded: {checkpoint.load_model(args.model).num_params():,} parameters")
    return 0


def cmd_tokenizer_apertus(args) -> int:
    file = tokenizer.rebuild_apertus(args.out, chat_template=None if args.base else chat.official_template())
    print(tokenizer.rebuilt_text(file, args.base))
    return 0


def cmd_tokenizer_train(args) -> int:
    # the Rust trainer draws its own progress bars; off a terminal it would only print blank lines
    max_bytes = int(args.max_mb * 1e6) if args.max_mb else None
    trained = tokenizer.train_from_corpus(args.corpus, args.vocab_size, args.out, min_frequency=args.min_frequency,
                                          max_bytes=max_bytes, progress=sys.stderr.isatty())
    print(tokenizer.trained_text(*trained, args.out))
    return 0


def cmd_tokenizer_eval(args) -> int:
    print(tokenizer_eval.summary_text(tokenizer.compare(args.tokenizer, args.corpus, args.out), args.out))
    return 0


def add_model_commands(sub) -> None:
    s = sub.add_parser("info", help="parameters, FLOPs per token and memory of a preset or checkpoint")
    s.add_argument("model", help="preset name (tiny, apertus-8b, apertus-70b), config.json, checkpoint directory or "
                   "hub id org/name[@revision]")
    s.add_argument("--seq-len", type=int, default=4096)
    s.add_argument("--gpus", type=int, default=1, help="GPUs the training memory is sharded over (FSDP)")
    s.add_argument("--load", action="store_true", help="also load the weights (checks the checkpoint)")
    s.set_defaults(func=cmd_info)

    tsub = sub.add_parser("tokenizer", help="the Apertus tokenizer: rebuild, train, evaluate").add_subparsers(
        dest="tokenizer_command", required=True)
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


# --- data ------------------------------------------------------------------------------------------------------------

def cmd_data_build(args) -> int:
    from .data.pipeline import build_text

    out = args.out or f"runs/data/{Path(args.recipe).stem}"
    print(f"building {args.recipe} -> {out}")
    built = forward(manifest.build_recorded, args, out=out)
    if built is not None:  # None: handed to Slurm/Ray, which finish on their own
        print(build_text(built, out))
    return 0


def cmd_data_info(args) -> int:
    from .data.pipeline import dataset_info

    print(forward(dataset_info, args))
    return 0


def cmd_data_fetch(args) -> int:
    from .data.fetch import fetch, listing

    print(listing() if args.name is None or args.list else f"{args.name} -> {fetch(args.name, args.to)}")
    return 0


def add_data_commands(sub) -> None:
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
    s = d.add_parser("fetch", help="download a data set from its pinned public source (sha256-checked) into the "
                     "user cache; without NAME: list what can be fetched")
    s.add_argument("name", nargs="?", help="e.g. apertus_tokenizer, hh_rlhf_harmless")
    s.add_argument("--to", help="folder to put NAME/ in (default $XDG_CACHE_HOME/apertus/data, read by every reader)")
    s.add_argument("--list", action="store_true", help="list the fetchable and the embedded data sets")
    s.set_defaults(func=cmd_data_fetch)


# --- training and export ---------------------------------------------------------------------------------------------

def add_train_commands(sub) -> None:
    s = sub.add_parser("train", help="pretrain from a TOML recipe (resumes from the newest checkpoint in --out)")
    pretrain.add_arguments(s)
    s.set_defaults(func=pretrain.command)
    for name, module, text in (
            ("sft", sft, "supervised fine-tuning on chat data (Apertus chat format, loss on assistant tokens)"),
            ("align", qrpo, "preference alignment: QRPO (or length-normalised DPO) on rewarded reference samples")):
        s = sub.add_parser(name, help=text + "; resumes from --out")
        posttrain.add_arguments(s, module.EXAMPLE)
        s.set_defaults(func=module.command)

    s = sub.add_parser("export", help="write a training checkpoint as a Hugging Face Apertus checkpoint or GGUF")
    s.add_argument("checkpoint", help="checkpoint folder (runs/X/checkpoints/step_N), or a run folder (newest), or "
                   "a Hugging Face checkpoint (directory or hub id org/name[@revision]) to convert")
    s.add_argument("--format", dest="fmt", choices=["hf", "gguf"], default="hf",
                   help="hf: a directory transformers loads; gguf: one file llama.cpp loads")
    s.add_argument("--out", help="output directory (hf) or .gguf file (default: RUN/export/..., or NAME-DTYPE[.gguf] "
                   "here for a Hugging Face checkpoint)")
    s.add_argument("--dtype", choices=["bf16", "fp32", "f16"], default="bf16", help="weights (f16: gguf only)")
    s.add_argument("--quant", help="gguf only: quantized matrices, q8_0 (here), or through llama.cpp's quantizer "
                   "(pip install llama-cpp-python) q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s/m/l, q4_k_s/m, q5_k_s/m, q6_k")
    s.add_argument("--tokenizer", help="tokenizer.json to include (default: the run's tokenizer/)")
    s.set_defaults(func=printed(checkpointing.export))


# --- inference: generate, chat, serve --------------------------------------------------------------------------------

def pii_filter_factory(args):
    """One streaming PII filter per reply, or None when the flags leave the output unfiltered."""
    if not (args.pii_filter or args.pii_hash_list):
        return None
    from .compliance.output_filter import filter_factory

    return filter_factory(args.pii_hash_list)


def engine_from_args(args):
    engine = Engine(args.model, **picked(args, ENGINE), output_filter=pii_filter_factory(args))
    print_start_info(engine, f"apertus {args.command}")
    return engine


def sampling_from_args(args, **extra):
    return SamplingParams(**picked(args, SAMPLING), **extra)


def cmd_generate(args) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    with engine_from_args(args) as engine:
        repl.generate(engine, prompt, sampling_from_args(args, stop=args.stop or None))
    return 0


def cmd_chat(args) -> int:
    with engine_from_args(args) as engine:
        repl.chat_loop(engine, sampling_from_args(args), system=args.system, thinking=args.think)
    return 0


def cmd_serve(args) -> int:
    from .infer.server import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("APERTUS_API_KEY"),
          model_name=args.served_model_name, max_body_mb=args.max_body_mb, output_filter=pii_filter_factory(args),
          log_level=args.log_level, **picked(args, ENGINE, SERVER_ENGINE))
    return 0


def add_engine_options(s, *groups: dict, **defaults) -> None:
    """The checkpoint and the engine's options (defaults: `Engine`'s), with the PII output filter."""
    s.add_argument("model", help=MODEL_HELP)
    add_options(s.add_argument_group("engine"), Engine, {k: v for g in (ENGINE, *groups) for k, v in g.items()},
                **defaults)
    g = s.add_argument_group("output filter")
    g.add_argument("--pii-filter", action="store_true", help="redact e-mails, IBANs, cards, IPs, phones in the output")
    g.add_argument("--pii-hash-list", help="also redact the removal requests of this salted hash list (implies "
                   "--pii-filter)")


def add_infer_commands(sub) -> None:
    s = sub.add_parser("generate", help="continue a prompt with a base model (streams the continuation)")
    add_engine_options(s)
    add_options(s.add_argument_group("sampling"), SamplingParams, SAMPLING, max_tokens=128)
    s.add_argument("--prompt", help="the text to continue (default: read stdin); BOS is added")
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="terminal chat with an instruct model (/reset, /think, /system, /quit)")
    add_engine_options(s)
    add_options(s.add_argument_group("sampling"), SamplingParams, SAMPLING, max_tokens=1024)
    s.add_argument("--system", help="system prompt (default: the Apertus one)")
    s.add_argument("--think", action="store_true", help="start with deliberation (reasoning) enabled")
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible server and web chat (http://127.0.0.1:8000/)")
    # a server answers 503 early rather than queueing as many requests as an engine used from Python
    add_engine_options(s, SERVER_ENGINE, max_queue=256)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="clients must send 'Authorization: Bearer KEY' (default: $APERTUS_API_KEY)")
    s.add_argument("--served-model-name", help="the model id clients use (default: the directory name)")
    s.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body (MiB); larger: 413")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)


# --- evaluation -------------------------------------------------------------------------------------------------------

EVAL_COMMANDS = ("tasks", "memorization", "lm-eval-hook")


def cmd_eval_tasks(args) -> int:
    out = args.out or f"runs/eval/{run_name(args.model)}"
    print(report.markdown(forward(suite.evaluate, args, out=out)), f"written to {out}", sep="\n")
    return 0


def cmd_eval_memorization(args) -> int:
    out = args.out or f"runs/eval/{run_name(args.model)}/memorization"
    print(forward(memorization.audit, args, out=out)["markdown"], f"written to {out}", sep="\n")
    return 0


def cmd_eval_hook(args) -> int:
    from .eval.harness import hook_text, install_hook

    print(hook_text(forward(install_hook, args), args.uninstall))
    return 0


def add_eval_commands(sub) -> None:
    esub = sub.add_parser("eval", help="evaluate a checkpoint: tasks, memorization audit, lm-eval adapter",
                          description="`apertus eval CKPT ...` is short for `apertus eval tasks CKPT ...`.",
                          ).add_subparsers(dest="eval_command", required=True)
    s = esub.add_parser("tasks", help="benchmark tasks; results as JSON + markdown table + PNG charts")
    s.add_argument("model", help="checkpoint directory or hub id org/name[@revision]")
    s.add_argument("--tasks", required=True, type=csv, help="comma-separated groups (flores_bpb, udhr_bpb, xcopa, "
                   "xwinograd, piqa, sib200, gsm8k, mgsm) or subtasks GROUP_LANG (xcopa_it, sib200_deu_Latn)")
    s.add_argument("--out", help="report directory (default runs/eval/<model name>)")
    add_options(s, suite.evaluate, MODEL_LOADING)
    s.add_argument("--langs", type=csv,
                   help="comma-separated language filter for multilingual groups (deu_Latn or deu, it)")
    s.add_argument("--limit", type=int, help="first N documents of each subtask")
    s.add_argument("--max-len", type=int, default=defaults_of(suite.evaluate)["max_len"],
                   help="longest input; longer texts are scored in windows")
    s.add_argument("--bpb-stride", type=int, help="tokens predicted per window of a long text (default max-len)")
    s.add_argument("--batch-tokens", type=int, default=defaults_of(suite.evaluate)["batch_tokens"],
                   help="tokens per forward pass (padding included)")
    g = s.add_argument_group("generative tasks (gsm8k, mgsm)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="chat format (default: if the checkpoint is an instruct one)")
    g.add_argument("--num-fewshot", type=int, default=defaults_of(suite.evaluate)["num_fewshot"])
    g.add_argument("--max-new-tokens", dest="max_tokens", type=int, metavar="N",
                   default=defaults_of(suite.evaluate)["max_tokens"])
    s.set_defaults(func=cmd_eval_tasks)

    s = esub.add_parser("memorization", help="Goldfish audit: extraction of inserted probes")
    s.add_argument("model", help="checkpoint directory or hub id org/name[@revision]")
    s.add_argument("--probes", dest="probes_path", required=True,
                   help="probes JSONL, or a built dataset directory holding probes.jsonl")
    s.add_argument("--out", help="report directory (default runs/eval/<model name>/memorization)")
    add_options(s, memorization.audit, MODEL_LOADING)
    add_options(s, memorization.audit, {"prefix": dict(type=int, help="prompt length in tokens"),
                                        "suffix": dict(type=int, help="continuation length in tokens"),
                                        "top_p": dict(type=float, help="nucleus sampling at temperature 1"),
                                        "seed": dict(type=int)})
    s.set_defaults(func=cmd_eval_memorization)

    s = esub.add_parser("lm-eval-hook", help="let the `lm_eval` command find `--model apertus`")
    s.add_argument("--uninstall", action="store_true")
    s.add_argument("--site-dir", help="default: this interpreter's site-packages")
    s.set_defaults(func=cmd_eval_hook)


# --- compliance ------------------------------------------------------------------------------------------------------

def cmd_optout_apply(args) -> int:
    from .compliance.optout import apply_optout, read_list, removal_text

    print(removal_text(apply_optout(args.dataset, robots=args.robots, urls=read_list(args.urls),
                                    domains=read_list(args.domains), text_hashes=read_list(args.text_hashes),
                                    dry_run=args.dry_run), args.dataset))
    return 0


def cmd_optout_check(args) -> int:
    from .compliance.optout import check, check_text

    res = forward(check, args)
    print(json.dumps(res, indent=1, ensure_ascii=False) if args.json else check_text(res, args.dataset))
    return 0 if res["found"] else 1


def cmd_redact(args) -> int:
    from .compliance.output_filter import hash_list_text, redact_stream, write_hash_list

    if args.make_hash_list:
        if not args.out:
            raise ValueError("--make-hash-list needs --out FILE")
        print(hash_list_text(write_hash_list(args.make_hash_list, args.out), args.out))
        return 0
    counts = redact_stream(sys.stdin, sys.stdout, kinds=args.kinds, hash_list=args.hash_list, chunk=args.chunk)
    print(f"[redacted: {counts}]", file=sys.stderr)
    return 0


def add_compliance_commands(sub) -> None:
    s = sub.add_parser("verify", help="re-hash every artifact of a run (shards, index, checkpoints) against run.json")
    s.add_argument("run_dir", help="a run folder with run.json, or a built dataset")
    s.set_defaults(func=printed(manifest.verify, manifest.verify_text, status=lambda r: 1 if r["problems"] else 0))

    s = sub.add_parser("manifest", help="write run.json for a finished data build or training run")
    s.add_argument("run_dir")
    s.add_argument("--kind", help="pretrain, sft, align (training runs; default pretrain)")
    s.set_defaults(func=printed(manifest.record, manifest.record_text))

    s = sub.add_parser("card", help="model card, data card and EU AI Act public summary from the run manifests")
    s.add_argument("run_dir", help="a run folder (its run.json and those one or two folders down are read)")
    s.add_argument("--out", help="output folder (default RUN_DIR/card)")
    s.add_argument("--name", dest="model_name", help="model name (default apertus-<folder name>)")
    s.add_argument("--provider", help="provider name and contact for the public summary")
    s.add_argument("--license", dest="license_", default="Apache-2.0")
    s.set_defaults(func=printed(cards.write_cards, lambda paths: "\n".join(f"wrote {p}" for p in paths.values())))

    osub = sub.add_parser("optout", help="retrospective removal from a built dataset; was X in the training data?"
                          ).add_subparsers(dest="optout_command", required=True)
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


# --- speedrun and report ---------------------------------------------------------------------------------------------

def cmd_speedrun(args) -> int:
    try:
        forward(speedrun.speedrun, args)
    except RuntimeError as e:  # a stage stopped early (SIGTERM) or failed: rerunning resumes
        print(f"apertus speedrun: {e}", file=sys.stderr)
        return 1
    return 0


def add_speedrun_commands(sub) -> None:
    s = sub.add_parser("speedrun", help="the whole pipeline on the embedded corpus (data, tokenizer, pretraining, "
                       "SFT, QRPO, eval, export, cards, chat) and report.md; resumes")
    s.add_argument("--out", default="runs/demo", help="run directory (default runs/demo); a rerun resumes")
    s.add_argument("--smoke", action="store_true", help="a few steps per stage (CI; about two minutes)")
    s.add_argument("--budget", choices=["demo", "hour"], default="demo",
                   help="demo (default): the quick run; hour: the demo's pretraining (more overfits the embedded "
                   "text), twice the SFT conversations and QRPO prompts, larger evaluations (within an hour on 2 "
                   "cores)")
    s.add_argument("--tokenizer", choices=["train", "apertus"], default="train",
                   help="train a small BPE on the corpus (default) or use the released Apertus tokenizer (slower)")
    s.add_argument("--stages", type=csv, help="comma-separated stages to (re)run: tokenizer, data, pretrain, sft, "
                   "align, eval, export, cards, chat (default: every stage not done yet)")
    s.set_defaults(func=cmd_speedrun)

    s = sub.add_parser("report", help="(re)write report.md of a speedrun directory")
    s.add_argument("run_dir")
    s.set_defaults(func=printed(speedrun_report.write_report, lambda path: f"wrote {path}"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apertus", description="The Apertus LLM system, open end to end.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (add_model_commands, add_data_commands, add_train_commands, add_infer_commands, add_eval_commands,
                add_compliance_commands, add_speedrun_commands):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"] and len(argv) > 1 and argv[1] not in EVAL_COMMANDS and not argv[1].startswith("-"):
        argv = ["eval", "tasks", *argv[1:]]  # the shorthand `apertus eval CKPT --tasks ...`
    args = build_parser().parse_args(argv)
    args.entry = ("apertus.cli", argv)  # what a training command relaunches under torchrun (--nproc)
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
