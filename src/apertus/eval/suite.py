"""`apertus eval MODEL --tasks ...`: resolve task names, score everything in one batched pass, aggregate.

Task groups and their subtasks (one per language):
    flores_bpb   bits-per-byte on the FLORES-200 test sentences of SIB-200, 205 languages
    udhr_bpb     bits-per-byte on the Universal Declaration of Human Rights, one value per language (467)
    xcopa        11 languages     xwinograd   6 languages     piqa     English
    sib200       topic classification, 205 languages
    langid       language identification by likelihood among 10 European languages (FLORES test sentences)
    gsm8k, mgsm  (11 languages) exact match, generated through the inference engine (generative.py)

Bits-per-byte = total NLL in bits / UTF-8 bytes of the text: it does not depend on the tokenizer, so models with
different vocabularies compare fairly. Each sentence (FLORES) or document (UDHR) is scored as `<s>` + text, as
documents are trained; its end-of-document token is not counted.
"""

from __future__ import annotations

import math
import os

from ..tokenizer import Tokenizer
from . import tasks as T

GROUPS = {
    "flores_bpb": ("bpb", T.sib200_langs),
    "udhr_bpb": ("bpb", lambda root: sorted(T.udhr_corpus(root))),
    "xcopa": ("mc", lambda root: list(T.XCOPA_CONNECTORS)),
    "xwinograd": ("mc", lambda root: list(T.XWINOGRAD_LANGS)),
    "piqa": ("mc", lambda root: [None]),
    "sib200": ("mc", T.sib200_langs),
    "langid": ("mc", lambda root: list(T.LANGID_LANGS)),
    "gsm8k": ("gen", lambda root: [None]),
    "mgsm": ("gen", lambda root: ["bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh"]),
}


def resolve(names: list[str], langs: list[str] | None = None, root=None) -> dict[str, tuple[str, str, str | None]]:
    """Task names (groups like `xcopa`, or subtasks like `xcopa_it`, `sib200_deu_Latn`) -> {subtask: (group, kind,
    language)}, filtered by `langs` (a language matches by its full code or the part before `_`)."""
    out = {}
    for name in names:
        group = next((g for g in GROUPS if name == g or name.startswith(g + "_")), None)
        if group is None:
            raise ValueError(f"unknown task {name!r}; groups: {', '.join(GROUPS)} (or GROUP_LANG)")
        kind, lang_fn = GROUPS[group]
        all_langs = lang_fn(root)
        if name == group:
            chosen = [lg for lg in all_langs if not langs or lg is None or lg in langs or lg.split("_")[0] in langs]
        else:
            lang = name[len(group) + 1:]
            if lang not in all_langs:
                raise ValueError(f"unknown language {lang!r} for {group}; choose from {', '.join(all_langs)}")
            chosen = [lang]
        if not chosen:
            raise ValueError(f"{group}: none of the languages {langs} is available")
        for lg in chosen:
            out[group if lg is None else f"{group}_{lg}"] = (group, kind, lg)
    return out


def _mc_docs(group: str, lang, root, candidates=T.LANGID_LANGS) -> list[T.MCDoc]:
    if group == "langid":
        return T.langid_docs(lang, candidates, root=root)
    if group == "xcopa":
        return T.xcopa_docs(lang, root=root)
    if group == "xwinograd":
        return T.xwinograd_docs(lang, root=root)
    if group == "piqa":
        return T.piqa_docs(root)
    return T.sib200_docs(lang, root=root)


def run_mc(loglik, subtasks: dict, limit: int | None = None, root=None) -> dict[str, dict]:
    """Every multiple-choice subtask in ONE call of `loglik(pairs) -> [log-likelihood]` (one sorted, batched pass;
    contexts shared by the choices are computed once)."""
    # langid's candidates: the languages asked for (all ten when only one is)
    langid = [lang for group, _, lang in subtasks.values() if group == "langid"]
    langid = langid if len(langid) > 1 else T.LANGID_LANGS
    docs = {name: _mc_docs(group, lang, root, langid)[:limit] for name, (group, kind, lang) in subtasks.items()
            if kind == "mc"}
    pairs = [p for ds in docs.values() for d in ds for p in d.pairs]
    lls = iter(loglik(pairs))
    results = {}
    for name, ds in docs.items():
        per_doc = [[next(lls) for _ in d.pairs] for d in ds]
        results[name] = T.mc_metrics(ds, per_doc)
    return results


def run_bpb(rolling_nll, vocab_size: int, subtasks: dict, limit: int | None = None, root=None) -> dict[str, dict]:
    """`rolling_nll(texts) -> [(nll_nats, n_tokens)]`; one call for all languages of all bpb subtasks."""
    udhr = T.udhr_corpus(root) if any(g == "udhr_bpb" for g, _, _ in subtasks.values()) else {}
    texts = {}
    for name, (group, kind, lang) in subtasks.items():
        if kind == "bpb":
            texts[name] = (T.flores_texts(lang, root=root) if group == "flores_bpb" else udhr[lang])[:limit]
    flat = [t for ts in texts.values() for t in ts]
    scores = iter(rolling_nll(flat))
    results = {}
    for name, ts in texts.items():
        nll = [next(scores) for _ in ts]
        results[name] = bpb_metrics(ts, nll, vocab_size)
    return results


def bpb_metrics(texts: list[str], nll: list[tuple[float, int]], vocab_size: int) -> dict:
    """bits-per-byte of the whole corpus (sum of bits / sum of bytes), its standard error over texts (delta method
    for a ratio of sums), token-level perplexity and tokens per byte (the tokenizer's compression). Chance is a
    uniform distribution over the vocabulary: log2(vocab) bits per token (what an untrained model scores)."""
    bits = [n / math.log(2) for n, _ in nll]
    nbytes = [len(t.encode("utf-8")) for t in texts]
    tokens = sum(k for _, k in nll)
    bpb = sum(bits) / sum(nbytes)
    n = len(texts)
    stderr = float("nan")
    if n > 1:
        mean_b = sum(nbytes) / n
        resid = [b - bpb * y for b, y in zip(bits, nbytes, strict=True)]
        stderr = math.sqrt(sum(r * r for r in resid) / (n - 1) / n) / mean_b
    return {"n": n, "bpb": bpb, "bpb_stderr": stderr, "chance": tokens * math.log2(vocab_size) / sum(nbytes),
            "bytes": sum(nbytes), "tokens": tokens,
            "token_ppl": math.exp(sum(x for x, _ in nll) / tokens), "tokens_per_byte": tokens / sum(nbytes)}


def aggregate(results: dict[str, dict], subtasks: dict) -> dict[str, dict]:
    """Group scores. Accuracies: size-weighted mean with the pooled standard error (lm-eval's group aggregation);
    bits-per-byte: the unweighted mean over languages (each language counts once)."""
    groups: dict[str, list[str]] = {}
    for name, (group, _, _) in subtasks.items():
        if name in results:
            groups.setdefault(group, []).append(name)
    out = {}
    for group, names in groups.items():
        rs = [results[n] for n in names]
        sizes = [r["n"] for r in rs]
        agg = {"n": sum(sizes), "subtasks": len(names), "chance": _wmean([r["chance"] for r in rs], sizes)}
        for metric in ("acc", "acc_norm", "acc_bytes", "exact_match"):
            if metric in rs[0]:
                agg[metric] = _wmean([r[metric] for r in rs], sizes)
                agg[metric + "_stderr"] = _pooled_stderr([r[metric + "_stderr"] for r in rs], sizes)
        if "bpb" in rs[0]:
            agg["bpb"] = sum(r["bpb"] for r in rs) / len(rs)
            agg["bpb_stderr"] = math.sqrt(sum(r["bpb_stderr"] ** 2 for r in rs)) / len(rs)
            agg["chance"] = sum(r["chance"] for r in rs) / len(rs)
        out[group] = agg
    return out


def _wmean(xs, ws) -> float:
    return sum(x * w for x, w in zip(xs, ws, strict=True)) / sum(ws)


def _pooled_stderr(stderrs, sizes) -> float:
    if sum(sizes) <= len(sizes):
        return float("nan")
    var = sum((n - 1) * s * s * n for s, n in zip(stderrs, sizes, strict=True)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))


def is_instruct(model_dir) -> bool:
    """An instruct checkpoint stops on the chat tokens (generation_config.json) or ships a chat template."""
    import json
    from pathlib import Path

    d = Path(model_dir)
    if (d / "chat_template.jinja").exists():
        return True
    try:
        eos = json.loads((d / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return False
    return isinstance(eos, list) and 68 in eos


def evaluate(model, tasks: list[str], *, out=None, limit: int | None = None, langs: list[str] | None = None,
             dtype: str = "fp32", device: str | None = None, tokenizer=None, max_len: int = 4096,
             batch_tokens: int = 8192, bpb_stride: int | None = None, chat: bool | None = None, num_fewshot: int = 8,
             max_tokens: int = 384, root=None, progress: bool = True, name: str | None = None) -> dict:
    """Evaluate `model` on `tasks`; write results.json/.md and charts under `out` if given.

    `model` is a checkpoint directory or an in-memory `apertus.model.Apertus` (then `tokenizer`, a Tokenizer or a
    tokenizer.json path, is required, and `dtype`/`device` are left as the model has them)."""
    from ..checkpoint import resolve_checkpoint_dir
    from .loglik import Scorer, load_tokenizer

    if isinstance(model, (str, os.PathLike)):
        name = name or str(model)
        model = resolve_checkpoint_dir(model)  # a hub id: its local snapshot (the report keeps the id as its name)
        scorer = Scorer.from_pretrained(model, dtype=dtype, device=device, tokenizer=tokenizer, max_len=max_len,
                                        batch_tokens=batch_tokens, progress=progress)
    else:
        if tokenizer is None:
            raise ValueError("evaluating an in-memory model needs its tokenizer")
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = load_tokenizer(tokenizer=tokenizer, vocab_size=model.config.vocab_size)
        name = name or f"{type(model).__name__} (in memory)"
        dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
        scorer = Scorer(model, tokenizer, max_len=max_len, batch_tokens=batch_tokens, progress=progress)
    was_training = scorer.model.training
    scorer.model.eval()
    try:
        return _evaluate(scorer, model, name, tasks, out, limit, langs, dtype, bpb_stride, chat, num_fewshot,
                         max_tokens, root)
    finally:
        scorer.model.train(was_training)


def _evaluate(scorer, model, name, tasks, out, limit, langs, dtype, bpb_stride, chat, num_fewshot, max_tokens, root):
    subtasks = resolve(tasks, langs, root)
    results: dict[str, dict] = {}
    if any(k == "mc" for _, k, _ in subtasks.values()):
        results.update(run_mc(lambda pairs: [ll for ll, _ in scorer.loglikelihood(pairs)], subtasks, limit, root))
    if any(k == "bpb" for _, k, _ in subtasks.values()):
        results.update(run_bpb(lambda texts: scorer.rolling_nll(texts, bpb_stride), scorer.model.config.vocab_size,
                               subtasks, limit, root))
    samples = {}
    if any(k == "gen" for _, k, _ in subtasks.values()):
        from ..infer.engine import Engine
        from .generative import engine_generate, run_gen

        if chat is None:  # an in-memory model is taken for a base model unless told
            chat = is_instruct(model) if isinstance(model, (str, os.PathLike)) else False
        with Engine(scorer.model, tokenizer=scorer.tokenizer) as engine:
            gen, samples = run_gen(engine_generate(engine), subtasks, chat=chat, tokenizer=scorer.tokenizer,
                                   limit=limit, num_fewshot=num_fewshot, max_tokens=max_tokens, root=root)
        results.update(gen)
    results = {t: results[t] for t in subtasks if t in results}
    report = {"model": name, "tasks": results, "groups": aggregate(results, subtasks),
              "config": {"tasks": tasks, "limit": limit, "langs": langs, "dtype": dtype, "max_len": scorer.max_len,
                         "bpb_stride": bpb_stride or scorer.max_len, "chat": chat, "num_fewshot": num_fewshot,
                         "max_tokens": max_tokens}}
    if out is not None:
        from .report import write_report

        write_report(report, out)
        if samples:
            from pathlib import Path

            from .generative import write_samples

            write_samples(Path(out) / "samples.jsonl", samples)
    return report


def run_eval(model, tokenizer=None, tasks: list[str] = ("flores_bpb", "xcopa", "piqa"), out_dir=None,
             limit: int | None = None, **kwargs) -> dict:
    """The evaluation as a library call (the speedrun uses it): `model` is a checkpoint directory or an in-memory
    `Apertus`; `tokenizer` a Tokenizer or tokenizer.json path (None: the checkpoint's). Writes results.json,
    results.md and PNG charts (per-language bars with error bars and the chance level; summary.png: the task
    groups against chance) under `out_dir` when given, and returns the report {"model", "tasks", "groups",
    "config"}. Other keyword arguments are those of `evaluate` (langs, max_len, batch_tokens, chat, num_fewshot,
    max_tokens, name, progress, ...)."""
    return evaluate(model, list(tasks), out=out_dir, limit=limit, tokenizer=tokenizer, **kwargs)
