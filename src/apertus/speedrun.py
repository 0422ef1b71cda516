"""The speedrun: the whole Apertus pipeline on the embedded corpus in one command, then a report.

    apertus speedrun --out runs/demo                 # 9 minutes on 2 cores with bf16 units
    apertus speedrun --budget hour --out runs/hour   # twice the SFT and QRPO data, larger evaluations
    apertus speedrun --smoke --out /tmp/smoke        # every stage, a few steps each (CI)
    apertus speedrun --out runs/demo --stages sft,eval   # rerun some stages (later ones read their outputs)
    apertus report runs/demo                         # regenerate runs/demo/report.md

A thin script over the stages' own entry points (nothing here trains, filters or evaluates by itself):

    tokenizer  BPE trained on the corpus the data recipe reads (or the released Apertus tokenizer); fertility on
               held-out FLORES test sentences, against the Apertus tokenizer
    data       recipes/data_tiny.toml with that tokenizer: langid, quality, PII, toxicity, dedup, shards (the funnel)
    pretrain   recipes/speedrun.toml: AdEMAMix, WSD, Goldfish, a multilingual stage then a code/math stage
    sft        recipes/sft_tiny.toml: GSM8K in the Apertus chat format
    align      recipes/align_tiny.toml: QRPO with rule-based rewards on engine rollouts
    eval       bits per byte by language, multiple choice (XCOPA, PIQA) of the base model; GSM8K of the aligned one
    export     Hugging Face checkpoint + GGUF (llama.cpp)
    cards      model card, data card, EU public summary from the run manifests
    chat       a few conversations through the inference engine

Each stage writes under OUT/<stage>/ and, when complete, OUT/<stage>/DONE (atomically). A rerun skips finished
stages and resumes an interrupted one (the data build and the trainers resume from their own checkpoints).
OUT/speedrun.json records the seconds and tokens of each stage; report.md is written at the end.
"""

from __future__ import annotations

import json
import shutil
import time
from itertools import zip_longest
from pathlib import Path

from .embedded import packaged_dir
from .eval.tasks import LANGID_LANGS
from .tokenizer_eval import FERTILITY_LANGS
from .util import atomic_write_json, hms

STAGES = ("tokenizer", "data", "pretrain", "sft", "align", "eval", "export", "cards", "chat")
RECIPES = packaged_dir("recipes", "recipes")  # recipes/ of the checkout, or apertus/recipes in a wheel
SYSTEM = "Solve the problem."
CHATS = [
    [{"role": "system", "content": SYSTEM},
     {"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
      "clips in May. How many clips did Natalia sell altogether in April and May?"}],
    [{"role": "system", "content": SYSTEM},
     {"role": "user", "content": "A baker makes 12 loaves of bread each hour. How many loaves does he make in 5 "
      "hours?"}],
    [{"role": "user", "content": "Was ist die Hauptstadt der Schweiz?"}],
]

# QRPO's rule-based reward: the recipe's (correct final answer, GSM8K format ending the turn) plus a graded shaping
# term, so that the tiny model's samples of a question differ in reward more often (ties give no training pair).
REWARD = "reward.functions={gsm8k_correct = 1.0, gsm8k_format = 1.0, gsm8k_closeness = 0.2}"
_GSM = '{format = "gsm8k", path = "gsm8k/%s.jsonl", skip = %d, limit = %d, system = "Solve the problem."}'
# Sizes of the budgets ("minutes": the aim on 2 cores). "demo" is the default; "hour" fine-tunes on twice the
# conversations, aligns on twice the prompts and evaluates on more, with the demo's pretraining: more pretraining
# overfits the embedded text of the ten languages (~11 passes already; twice the tokens ended 2.6% below the unigram
# against 18%, and wider or deeper models at the same tokens did worse too, runs/train_results.md).
# SFT and QRPO read disjoint slices of the GSM8K train split (QRPO's prompts start where SFT's end).
FULL = {
    "vocab_size": 8192, "tokenizer_mb": 12.0, "minutes": 10,
    "data": {},
    "pretrain": [],
    # 327 steps; from the current pretraining, 2,400 conversations left 83% of held-out samples in format, 3,600 97%
    # (earlier pretrained models: 1,200 gave 75-100%, 600 66%)
    "sft": [f"data.sources=[{_GSM % ('train', 0, 3600)}]", "train.compile=true"],
    # 256 new tokens: GSM8K's answers are a median of 123 tokens of this tokenizer (90% within 225), so 128 would cut
    # off answers that end in the right format (at 128, 84% of the SFT model's held-out samples ended their turn).
    # lr 1e-4: at the recipe's 2e-4, QRPO from the current SFT model diverged (gradient norms ~100, 19% of samples
    # ending their turn, against 97% at 1e-4)
    "align": [f"data.prompts=[{_GSM % ('train', 3600, 64)}]", "sampling.max_tokens=256", REWARD, "optim.lr=1e-4"],
    "eval_base": {"tasks": ["flores_bpb", "langid", "xcopa_it", "piqa"], "langs": list(LANGID_LANGS), "limit": 50},
    "eval_chat": {"tasks": ["gsm8k"], "limit": 16, "max_tokens": 160},
    "chat_tokens": 160,
}
HOUR = FULL | {
    "minutes": 60,
    "sft": [f"data.sources=[{_GSM % ('train', 0, 7200)}]", "train.compile=true"],
    "align": [f"data.prompts=[{_GSM % ('train', 7200, 128)}]", f"data.eval_prompts=[{_GSM % ('test', 0, 64)}]",
              "sampling.max_tokens=256", REWARD, "optim.lr=1e-4"],
    "eval_base": FULL["eval_base"] | {"limit": 100},
    "eval_chat": FULL["eval_chat"] | {"limit": 64},
}
BUDGETS = {"demo": FULL, "hour": HOUR}
SMOKE = {
    "vocab_size": 2048, "tokenizer_mb": 1.0, "fertility_langs": FERTILITY_LANGS,
    # a few documents of a few languages: the stages take every language (no stage's languages would be there)
    "data": {"limits": {"udhr": 20, "flores": 60, "gsm8k": 100, "code": 10}, "tasks": 2, "all_languages": True},
    "pretrain": ["stages.0.steps=4", "stages.1.steps=2", "train.seq_len=128", "train.global_batch_tokens=1024",
                 "train.micro_batch=8", "train.compile=false", "schedule.warmup_tokens=1024",
                 "schedule.cooldown_tokens=2048", "optim.t_alpha=6", "optim.t_beta3=6", "eval.every=3",
                 "eval.batches=1", "eval.languages=[]", "eval.sample_tokens=4", "checkpoint.every=3",
                 "train.log_every=1"],
    "sft": [f"data.sources=[{_GSM % ('train', 0, 16)}]", f"data.val_sources=[{_GSM % ('test', 1000, 4)}]",
            "train.batch_size=4", "train.micro_batch=4", "train.log_every=1"],
    "align": [f"data.prompts=[{_GSM % ('train', 600, 6)}]", f"data.eval_prompts=[{_GSM % ('test', 0, 2)}]",
              "sampling.n=6", "sampling.max_tokens=16", "sampling.eval_n=1", "train.epochs=1", "train.batch_size=2",
              "train.micro_batch=2", "train.log_every=1",
              REWARD],
    "eval_base": {"tasks": ["flores_bpb", "langid", "xcopa_it", "piqa"], "langs": ["eng_Latn", "deu_Latn"], "limit": 4},
    "eval_chat": {"tasks": ["gsm8k"], "limit": 2, "max_tokens": 16},
    "chat_tokens": 16,
}


# --- bookkeeping ------------------------------------------------------------------------------------------------------


def _read_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.is_file() else default


def _last_metrics(run: Path) -> dict:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    rows = [json.loads(line) for line in lines if line.strip()]
    return next((r for r in reversed(rows) if "tokens" in r), {})


# --- the stages -------------------------------------------------------------------------------------------------------


def stage_tokenizer(out: Path, sizes: dict, tokenizer: str) -> dict:
    """The BPE of the run: trained on the UDHR + FLORES dev text the data recipe reads (the FLORES test sentences
    stay held out for fertility and bits per byte), or the released Apertus tokenizer."""
    from .tokenizer import Tokenizer, apertus_tokenizer_path, train_tokenizer
    from .tokenizer_eval import evaluate, read_flores, read_udhr

    apertus = Tokenizer.from_file(apertus_tokenizer_path())
    if tokenizer == "apertus":
        tok = apertus
        tok.save(out)
        trained_bytes = 0
    else:
        texts, trained_bytes, budget = [], 0, sizes["tokenizer_mb"] * 1e6
        # round-robin over languages so a byte budget still covers every language
        corpora = [list(read_udhr().values()), list(read_flores(splits=("dev",)).values())]
        for text in (t for pair in zip_longest(*corpora) for t in pair if t):
            if trained_bytes >= budget:
                break
            text = text[:int(budget / 400)]
            texts.append(text)
            trained_bytes += len(text.encode())
        t = time.time()
        tok = train_tokenizer(texts, sizes["vocab_size"], out)
        print(f"trained a {tok.vocab_size:,}-token BPE on {trained_bytes / 1e6:.1f} MB ({len(texts)} texts) in "
              f"{time.time() - t:.1f}s")
    langs = sizes.get("fertility_langs")  # smoke: a few languages; full: all 205
    held_out = {k: v for k, v in read_flores(splits=("test",)).items() if langs is None or k in langs}
    res = evaluate({"speedrun" if tokenizer != "apertus" else "apertus": tok} |
                   ({"apertus": apertus} if tokenizer != "apertus" else {}), held_out, out / "fertility")
    for name, r in res.items():
        s = r["summary"]
        print(f"fertility of {name} on held-out FLORES ({s['languages']} languages): median "
              f"{s['median_tokens_per_word']:.2f} tokens/word, mean {s['mean_tokens_per_byte']:.3f} tokens/byte")
    return {"tokens": 0, "bytes": trained_bytes, "vocab_size": tok.vocab_size}


def stage_data(out: Path, sizes: dict, run: Path) -> dict:
    from .compliance.manifest import build_recorded
    from .config import load_toml
    from .data.pipeline import funnel_table

    recipe = load_toml(RECIPES / "data_tiny.toml")
    recipe["dataset"]["tokenizer"] = str((run / "tokenizer" / "tokenizer.json").resolve())
    for src in recipe["sources"]:
        if src["name"] in sizes["data"].get("limits", {}):
            src["limit"] = sizes["data"]["limits"][src["name"]]
    if "tasks" in sizes["data"]:
        recipe["executor"]["tasks"] = sizes["data"]["tasks"]
    for stage in recipe["stages"] if sizes["data"].get("all_languages") else []:
        stage.pop("languages", None)
    manifest = build_recorded(recipe, out / "dataset")
    print(funnel_table(manifest))
    return {"tokens": sum(s["n_tokens"] for s in manifest["shards"])}


def stage_pretrain(out: Path, sizes: dict, run: Path) -> dict:
    from .compliance.manifest import record
    from .tokenizer import Tokenizer
    from .train import pretrain
    from .train.checkpointing import export_checkpoint

    vocab = Tokenizer.from_file(run / "tokenizer").vocab_size
    pretrain.run(RECIPES / "speedrun.toml", out, overrides=[f"data.dataset={run}/data/dataset",
                                                            f"model.vocab_size={vocab}", *sizes["pretrain"]])
    recipe = json.loads((out / "recipe.json").read_text())
    if _last_metrics(out).get("step") != sum(st["steps"] for st in recipe["stages"]):
        raise RuntimeError(f"{out}: pretraining stopped before its last step; rerun to resume")
    record(out, "pretrain")
    export_checkpoint(out, out / "hf", dtype="fp32")
    return {"tokens": _last_metrics(out).get("tokens", 0)}


def stage_sft(out: Path, sizes: dict, run: Path) -> dict:
    from .train import sft

    sft.run(RECIPES / "sft_tiny.toml", out, overrides=[f"model.init_from={run}/pretrain/hf", *sizes["sft"]])
    return {"tokens": _last_metrics(out).get("tokens", 0)}


def stage_align(out: Path, sizes: dict, run: Path) -> dict:
    from .train import qrpo

    qrpo.run(RECIPES / "align_tiny.toml", out, overrides=[f"model.init_from={run}/sft/hf", *sizes["align"]])
    return {"tokens": _last_metrics(out).get("tokens", 0)}


def stage_eval(out: Path, sizes: dict, run: Path) -> dict:
    """Base model: bits per byte by language and multiple choice (log-likelihoods); aligned model: GSM8K (generated
    through the engine, in the chat format)."""
    from .eval.report import markdown
    from .eval.suite import evaluate

    b, c = sizes["eval_base"], sizes["eval_chat"]
    base = evaluate(str(run / "pretrain" / "hf"), b["tasks"], out=out / "base", limit=b["limit"], langs=b["langs"],
                    max_len=512, batch_tokens=4096)
    print(markdown(base))
    unigram = unigram_baseline(run, b["langs"], b["limit"])
    atomic_write_json(out / "base" / "unigram.json", unigram)
    print("unigram baseline (bits per byte, fitted on the training documents of these languages): " +
          ", ".join(f"{lang} {v:.3f}" for lang, v in unigram["bpb"].items()))
    chat = evaluate(str(run / "align" / "hf"), c["tasks"], out=out / "chat", limit=c["limit"], num_fewshot=0,
                    max_tokens=c["max_tokens"], max_len=640)
    print(markdown(chat))
    return {"tokens": 0}


def unigram_baseline(run: Path, langs: list[str], limit: int) -> dict:
    """Bits per byte of the run's tokenizer as a unigram model fitted on the documents of the first pretraining stage
    (its sources and languages), on the same held-out FLORES sentences of `langs` as the model: what counting tokens
    alone reaches. (Not on every document of `langs`: English would then be mostly GSM8K, a weaker baseline.)"""
    from .eval.tasks import flores_texts
    from .eval.unigram import unigram_bpb, unigram_counts
    from .tokenizer import Tokenizer

    tok = Tokenizer.from_file(run / "tokenizer")
    dataset = run / "data" / "dataset"
    stage = json.loads((dataset / "manifest.json").read_text())["stages"][0]
    sources = sorted(stage["sources"])
    counts = unigram_counts(dataset, stage.get("languages"), sources)
    bpb = {}
    for lang in langs:
        texts = flores_texts(lang)[:limit]
        bpb[lang] = unigram_bpb(counts, tok.encode_batch(texts, bos=False), texts)
    return {"languages": langs, "sources": sources, "train_tokens": int(counts.sum()), "bpb": bpb,
            "mean": sum(bpb.values()) / len(bpb)}


def stage_export(out: Path, sizes: dict, run: Path) -> dict:
    from .checkpoint import replace_dir
    from .export_gguf import export_gguf

    tmp = out / ".hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run / "align" / "hf", tmp)
    replace_dir(tmp, out / "hf")
    gguf_file = export_gguf(out / "hf", out / "apertus-speedrun.gguf", dtype="f32")
    print(f"wrote {out / 'hf'} (Hugging Face) and {gguf_file} ({gguf_file.stat().st_size / 1e6:.1f} MB, llama.cpp)")
    return {"tokens": 0}


def stage_cards(out: Path, sizes: dict, run: Path) -> dict:
    from .compliance.cards import write_cards

    for path in write_cards(run, out, model_name="apertus-speedrun").values():
        print(f"wrote {path}")
    return {"tokens": 0}


def stage_chat(out: Path, sizes: dict, run: Path) -> dict:
    from .chat import STOP_IDS, encode_chat
    from .infer.engine import Engine
    from .infer.sampler import SamplingParams

    rows = []
    with Engine(str(run / "export" / "hf"), dtype="fp32") as engine:
        prompts = [encode_chat(engine.tokenizer, m, add_generation_prompt=True, date="2025-09-02")[0] for m in CHATS]
        # greedy; the penalty keeps a 4M-parameter model from looping on one token
        params = SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=sizes["chat_tokens"],
                                stop_token_ids=list(STOP_IDS))
        for messages, req in zip(CHATS, engine.generate(prompts, params), strict=True):
            req.result()
            rows.append({"messages": messages, "reply": req.text, "finish_reason": req.finish_reason,
                         "tokens": len(req.output_ids)})
            print(f"user: {messages[-1]['content']}\nassistant: {req.text.strip()}\n")
    atomic_write_json(out / "chats.json", rows)
    return {"tokens": sum(r["tokens"] for r in rows)}


# --- the run ----------------------------------------------------------------------------------------------------------


def speedrun(out: str | Path, smoke: bool = False, tokenizer: str = "train", stages: list[str] | None = None,
             budget: str = "demo") -> Path:
    """Run (or resume) the speedrun into `out`; `stages` reruns just those; `budget` is "demo" (the default) or
    "hour" (more post-training and evaluation, see HOUR). Returns the report's path."""
    from .speedrun_report import total_seconds, write_report

    run = Path(out).resolve()
    run.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(stages or ()) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; budgets: {', '.join(BUDGETS)}")
    if smoke and budget != "demo":
        raise ValueError("--smoke and --budget exclude each other: the smoke run has its own sizes")
    mode = {"smoke": smoke, "tokenizer": tokenizer} | ({"budget": budget} if budget != "demo" else {})
    state = _read_json(run / "speedrun.json", {"mode": mode, "stages": {}})
    if state["mode"] != mode:
        raise ValueError(f"{run} holds a speedrun with {state['mode']} (not {mode}); choose another --out")
    sizes = SMOKE if smoke else BUDGETS[budget]
    state["aim_minutes"] = sizes.get("minutes")  # the report marks the run's time against it
    from .train.recipe import fast_dtype

    if fast_dtype() == "fp32":
        print("training in fp32: this CPU has no bf16 matrix units (bf16 autocast would be ~10x slower here)")
    t_run = time.time()
    todo = [s for s in STAGES if (s in stages if stages else not (run / s / "DONE").is_file())]
    for i, name in enumerate(STAGES, 1):
        folder = run / name
        if name not in todo:
            print(f"== [{i}/{len(STAGES)}] {name}: done ({folder}/DONE), skipped", flush=True)
            continue
        for prev in STAGES[:i - 1]:
            if not (run / prev / "DONE").is_file():
                raise FileNotFoundError(f"stage {name} needs stage {prev} first ({run / prev}/DONE is missing)")
        if stages and folder.exists():  # an explicit rerun starts the stage afresh
            shutil.rmtree(folder)
        folder.mkdir(exist_ok=True)
        print(f"\n== [{i}/{len(STAGES)}] {name}  (elapsed {hms(time.time() - t_run)})", flush=True)
        t, fn = time.time(), globals()[f"stage_{name}"]
        # time spent in interrupted attempts counts too (the trainers resume from where those stopped)
        before = state.setdefault("interrupted", {}).pop(name, 0.0)
        before = 0.0 if stages else before  # an explicit rerun starts afresh
        try:
            result = fn(folder, sizes, tokenizer) if name == "tokenizer" else fn(folder, sizes, run)
        except BaseException:
            state["interrupted"][name] = round(before + time.time() - t, 1)
            atomic_write_json(run / "speedrun.json", state)
            raise
        result["seconds"] = round(before + time.time() - t, 1)
        state["stages"][name] = result
        atomic_write_json(run / "speedrun.json", state)
        atomic_write_json(folder / "DONE", result)
        print(f"== {name} finished in {hms(result['seconds'])} ({result['tokens']:,} tokens)", flush=True)
    report = write_report(run)
    print(f"\nspeedrun finished: {hms(total_seconds(state))} of stage time in all; report: {report}")
    return report
