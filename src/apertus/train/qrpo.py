"""Preference alignment with QRPO (docs/recipe.md §6.2), length-normalised DPO as the baseline, on the shared training
loop.

    apertus align recipes/align_tiny.toml [--out DIR] [--set loss.name="dpo" ...] [--nproc N]

The pipeline, each stage's output kept in the run folder so a run can be inspected and resumed:
1. rollouts/ (one JSONL line per prompt, written chunk by chunk; a rerun continues after the last complete chunk):
   n reference completions per prompt sampled from the starting (SFT) model π_ref with the engine, batched, one
   seed per sample; their rewards (rewards.py) and those of the off-policy candidates the recipe names; the training
   pair by the [pairs] rule (pairs.py: the best and worst of the pool, or as Apertus built them: a chosen that beats
   every on-policy sample, a rejected below their 20th percentile); each one's quantile reward R_q = share of the
   reference rewards <= its reward, and its reference log-probability, computed once here.
2. checkpoints/, metrics.jsonl: the loop trains on the pairs with the QRPO regression loss (both completions are
   pointwise targets) or DPO (the pair), LR warmup then linear decay, AdEMAMix.
3. hf/: the instruct checkpoint; eval/: mean reward on held-out prompts, π_ref against the trained policy, with
   the same sampling seeds.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ApertusConfig
from ..util import atomic_write_text
from .chat_data import prompt_of, read_sources
from .distributed import Dist, barrier, init_distributed
from .loop import train
from .loss import linear_cross_entropy
from .pairs import RULES, Pairs, as_candidate, choose_pair, column_candidates, read_candidate_file
from .posttrain import (
    PAD,
    Export,
    PosttrainOptim,
    PosttrainTrain,
    RowSource,
    check_common,
    export_instruct,
    load_tokenizer,
    log,
    record_run,
    run_date,
    schedule,
    total_steps,
    write_run_files,
)
from .posttrain import command as posttrain_command
from .posttrain import main as posttrain_main
from .posttrain import run as posttrain_run
from .pretrain import training_model
from .recipe import Checkpoint, ensure, loop_config, make_optimizer, parse_model, parse_tables

# --- the losses -------------------------------------------------------------------------------------------------------


def beta_log_z(beta: torch.Tensor) -> torch.Tensor:
    """β·log Z_q with Z_q = β(e^{1/β} − 1), the partition function of the uniform quantile reward: exactly
    β log β + β log(e^{1/β} − 1), and β log β + 1 for β <= 0.2 (as Apertus computed it: e^{1/β} overflows for small
    β; the approximation is off by β·log(1 − e^{−1/β}), at most 0.0014)."""
    approx = beta * torch.log(beta) + 1
    exact = beta * torch.log(beta) + beta * torch.log(torch.expm1(1 / beta.clamp(min=0.2)))
    return torch.where(beta <= 0.2, approx, exact)


def qrpo_losses(policy_logps, ref_logps, quantile_rewards, lengths, beta: float = 5.0, max_beta: float | None = 0.1,
                length_normalize: bool = True) -> torch.Tensor:
    """Per completion (R_q − β log Z_q − β·log π(y)/π_ref(y))², with β → β/|y| (clamped at max_beta)."""
    b = torch.full_like(policy_logps, beta)
    if length_normalize:
        b = b / lengths
    if max_beta:
        b = b.clamp(max=max_beta)
    return (quantile_rewards - beta_log_z(b) - b * (policy_logps - ref_logps)) ** 2


def qrpo_loss(policy_logps, ref_logps, quantile_rewards, lengths, beta: float = 5.0,
              max_beta: float | None = 0.1) -> torch.Tensor:
    """The length-normalised QRPO loss of Apertus, averaged over completions. One entry per completion: its summed
    log-probability under the policy and the reference, its quantile reward in [0, 1] and its length in tokens."""
    return qrpo_losses(policy_logps, ref_logps, quantile_rewards, lengths, beta, max_beta).mean()


def dpo_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths,
               beta: float = 5.0, length_normalize: bool = True) -> torch.Tensor:
    """Per pair −log σ(β_c·log π/π_ref(y_c) − β_r·log π/π_ref(y_r)), β_y = β/|y| when length-normalised."""
    bc = beta / chosen_lengths if length_normalize else beta
    br = beta / rejected_lengths if length_normalize else beta
    return -F.logsigmoid(bc * (chosen_logps - ref_chosen_logps) - br * (rejected_logps - ref_rejected_logps))


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """Summed log-probability of each row's completion tokens (loss_mask on labels), with gradients."""
    hidden = model.hidden_states(batch["input_ids"])
    w = model.lm_head.weight
    return torch.stack([-linear_cross_entropy(hidden[i], w, batch["labels"][i], batch["loss_mask"][i])
                        for i in range(hidden.shape[0])])


# --- recipe -----------------------------------------------------------------------------------------------------------


@dataclass
class AlignData:
    prompts: list = field(default_factory=list)  # chat_data sources; a final assistant turn is dropped from prompts
    eval_prompts: list = field(default_factory=list)  # held-out prompts: mean reward before and after
    tokenizer: str | None = None  # default: the init_from checkpoint's
    date: str = ""  # as in SFT
    dataset_candidates: bool = False  # the dataset's answers (orca's rejected ones, meta.candidates too) join the pool
    candidates_column: str = ""  # a meta field of each prompt row holding off-policy completions (pairs.py)
    candidates_file: str = ""  # JSONL of off-policy completions per prompt index (pairs.py)
    rollouts: str = ""  # reuse the rollouts folder of another run (e.g. DPO on QRPO's samples); "": sample here


@dataclass
class Sampling:
    n: int = 10  # reference samples per prompt (docs/recipe.md §6.2)
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int = 0
    chunk: int = 64  # prompts sampled, scored and written together
    eval_n: int = 4  # samples per held-out prompt
    cache_gb: float = 1.0


@dataclass
class Reward:
    kind: str = "function"  # function | model | judge (rewards.py)
    functions: dict = field(default_factory=dict)  # {name or module:function = weight}
    path: str = ""  # the reward model or judge checkpoint
    rubric: str = "charter"  # the judge's rubric: "charter" or a text file
    batch_size: int = 8


@dataclass
class Loss:
    name: str = "qrpo"  # qrpo | dpo
    beta: float = 5.0
    max_beta: float = 0.1  # QRPO's clamp of β/|y|; 0: none
    length_normalize: bool = True


@dataclass
class AlignRecipe:
    model: ApertusConfig
    init_from: str | None
    data: AlignData
    sampling: Sampling
    reward: Reward
    loss: Loss
    pairs: Pairs
    train: PosttrainTrain
    optim: PosttrainOptim
    checkpoint: Checkpoint
    export: Export


def parse_align_recipe(d: dict, world_size: int = 1) -> AlignRecipe:
    model, init_from = parse_model(d.get("model"))
    tables = parse_tables(d, {"data": AlignData, "sampling": Sampling, "reward": Reward, "loss": Loss,
                              "pairs": Pairs, "train": PosttrainTrain, "optim": PosttrainOptim,
                              "checkpoint": Checkpoint, "export": Export})
    r = AlignRecipe(model=model, init_from=init_from, **tables)
    ensure(bool(init_from), "[model] init_from must name the starting (SFT) checkpoint: it is also π_ref")
    ensure(bool(r.data.prompts), "[data] prompts is empty")
    s, lo = r.sampling, r.loss
    ensure(s.n >= 2 and s.max_tokens >= 1 and s.chunk >= 1 and s.eval_n >= 1, "[sampling] need n >= 2, "
           "max_tokens >= 1, chunk >= 1, eval_n >= 1")
    ensure(s.temperature >= 0 and 0 < s.top_p <= 1, "[sampling] need temperature >= 0 and 0 < top_p <= 1")
    ensure(lo.name in ("qrpo", "dpo") and lo.beta > 0 and lo.max_beta >= 0, "[loss] name must be 'qrpo' or 'dpo', "
           "beta > 0, max_beta >= 0")
    ensure(r.reward.kind in ("function", "model", "judge"), "[reward] kind must be 'function', 'model' or 'judge'")
    ensure(r.pairs.rule in RULES and 0 < r.pairs.rejected_quantile < 1, f"[pairs] rule must be one of "
           f"{', '.join(RULES)} and 0 < rejected_quantile < 1")
    ensure(not r.data.candidates_file or Path(r.data.candidates_file).is_file(), f"[data] candidates_file "
           f"{r.data.candidates_file}: no such file")
    check_common(model, r.train, r.optim, world_size)
    return r


# --- 1. rollouts ------------------------------------------------------------------------------------------------------


def read_records(folder: Path) -> dict[int, dict]:
    """The prompt records of every rank's file (a line cut short by a kill is ignored)."""
    records = {}
    for f in sorted(folder.glob("rank*.jsonl")) if folder.is_dir() else []:
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[rec["index"]] = rec
    return records


def load_prompts(tok, sources: list[dict], max_tokens: int, seq_len: int, date: str, with_candidates: bool,
                 column: str = "", file_pool: dict[int, list[dict]] | None = None):
    """[(record, off-policy candidates)] with record = {index, messages, meta, prompt_ids} or {index, skipped: reason};
    the candidates ({"text", "finish_reason", "source"}, pairs.py): the dataset's answers when `with_candidates`, the
    row's meta field `column`, the completions `file_pool` holds for the prompt's index."""
    from ..chat import encode_chat

    out = []
    for i, conv in enumerate(read_sources(sources)):
        rec = {"index": i}
        if "error" in conv:
            out.append(({**rec, "skipped": "invalid"}, []))
            continue
        messages, answer = prompt_of(conv)
        rec.update(messages=messages, meta=conv["meta"], tools=conv["tools"], enable_thinking=conv["enable_thinking"])
        try:
            ids = encode_chat(tok, messages, tools=conv["tools"], enable_thinking=conv["enable_thinking"],
                              add_generation_prompt=True, date=date)[0]
            ok = bool(messages) and messages[-1].get("role") in ("user", "tool")
        except ValueError:
            ok = False
        if not ok:
            rec["skipped"] = "invalid"
        elif len(ids) + max_tokens > seq_len:
            rec["skipped"] = "too_long"
        else:
            rec["prompt_ids"] = ids
        texts = [answer, conv["meta"].get("rejected"), *(conv["meta"].get("candidates") or [])]
        pool = [as_candidate(t, "dataset") for t in texts if isinstance(t, str)] if with_candidates else []
        pool += column_candidates(conv["meta"], column) + (file_pool or {}).get(i, [])
        out.append((rec, pool))
    return out


def candidate_ids(tok, rec: dict, text: str, date: str) -> list[int] | None:
    """The tokens of a dataset answer as the assistant turn after the prompt (None if they do not extend it)."""
    from ..chat import encode_chat

    ids = encode_chat(tok, rec["messages"] + [{"role": "assistant", "content": text}], tools=rec["tools"],
                      enable_thinking=rec["enable_thinking"], date=date)[0]
    n = len(rec["prompt_ids"])
    return ids[n:] if ids[:n] == rec["prompt_ids"] else None


def pair_batch(pairs: list[tuple[list[int], dict, dict]]) -> dict:
    """Rows chosen, rejected, chosen, ... of (prompt ids, chosen, rejected) pairs, right-padded; the loss mask marks
    the labels that are completion tokens; per row its reference log-prob, quantile reward and length."""
    seqs, starts, items = [], [], []
    for prompt, chosen, rejected in pairs:
        for c in (chosen, rejected):
            seqs.append(prompt + c["ids"])
            starts.append(len(prompt) - 1)
            items.append(c)
    T = max(len(s) for s in seqs) - 1
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    labels = torch.full((len(seqs), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, start) in enumerate(zip(seqs, starts, strict=True)):
        ids[i, :len(s) - 1] = torch.tensor(s[:-1])
        labels[i, :len(s) - 1] = torch.tensor(s[1:])
        mask[i, start:len(s) - 1] = True
    f = lambda key: torch.tensor([float(c.get(key) or 0.0) for c in items])  # noqa: E731
    return {"input_ids": ids, "labels": labels, "loss_mask": mask, "ref_logps": f("ref_logp"),
            "quantiles": f("quantile"), "rewards": f("reward"), "lengths": torch.tensor([float(len(c["ids"]))
                                                                                       for c in items])}


def _drop_partial_line(file: Path):
    """Cut a line a kill left unfinished, so the next record starts on a line of its own."""
    if file.exists():
        data = file.read_bytes()
        if data and not data.endswith(b"\n"):
            os.truncate(file, data.rfind(b"\n") + 1)


def rollout_dtype(t: PosttrainTrain, device) -> torch.dtype:
    """Weights for sampling and reference log-probs: bf16 on GPUs when training in bf16 (what the FSDP forward
    computes in with bf16 parameters), else fp32 (the training forward's master weights under autocast)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" and t.dtype == "bf16" else torch.float32


def rollouts(recipe: AlignRecipe, tok, folder: Path, d: Dist, date: str) -> dict[int, dict]:
    """Stage 1 for this rank's prompts (i % ranks == rank) not yet in the folder; then every rank's records."""
    from ..chat import STOP_IDS
    from ..checkpoint import load_model
    from ..infer import Engine, SamplingParams
    from .rewards import build_reward

    s, t = recipe.sampling, recipe.train
    done = read_records(folder)
    data = recipe.data
    file_pool = read_candidate_file(data.candidates_file) if data.candidates_file else None
    todo = [(rec, pool) for rec, pool in load_prompts(tok, data.prompts, s.max_tokens, t.seq_len, date,
                                                      data.dataset_candidates, data.candidates_column, file_pool)
            if rec["index"] % d.world_size == d.rank and rec["index"] not in done]
    if todo:
        from tqdm import tqdm

        folder.mkdir(parents=True, exist_ok=True)
        file = folder / f"rank{d.rank:05d}.jsonl"
        _drop_partial_line(file)
        model = load_model(recipe.init_from, dtype=rollout_dtype(t, d.device), device=d.device)
        reward = build_reward(recipe.reward, date, d.device)
        engine = Engine(model, tokenizer=tok, device=d.device, cache_gb=s.cache_gb, max_batch=256)
        autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=t.dtype == "bf16")
        bar = tqdm(total=len(todo), desc="rollouts", unit="prompt", disable=not d.main, dynamic_ncols=True)
        try:
            with open(file, "a", encoding="utf-8") as f:
                for k in range(0, len(todo), s.chunk):
                    chunk = todo[k:k + s.chunk]
                    _rollout_chunk(chunk, engine, reward, tok, recipe, date, autocast, SamplingParams, STOP_IDS)
                    for rec, _ in chunk:
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())  # a chunk on disk is never sampled again
                    bar.update(len(chunk))
                    bar.set_postfix(samples_per_s=f"{bar.n * s.n / max(bar.format_dict['elapsed'], 1e-9):.1f}")
        finally:
            bar.close()
            engine.close()
            if hasattr(reward, "close"):
                reward.close()
            del model, engine
            gc.collect()
    barrier()
    return read_records(folder)


def _rollout_chunk(chunk, engine, reward, tok, recipe: AlignRecipe, date, autocast, SamplingParams, STOP_IDS):
    s = recipe.sampling
    live = [(rec, pool) for rec, pool in chunk if "skipped" not in rec]
    prompts, params = [], []
    for rec, _ in live:
        for j in range(s.n):
            prompts.append(rec["prompt_ids"])
            params.append(SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=0, max_tokens=s.max_tokens,
                                         seed=s.seed * 1_000_000_007 + rec["index"] * 1000 + j,
                                         stop_token_ids=list(STOP_IDS), repetition_penalty=1.0))
    results = iter(engine.generate(prompts, params) if prompts else [])
    items, owners = [], []
    for rec, pool in live:
        rec["samples"] = [{"ids": r.output_ids, "text": r.text, "finish_reason": r.finish_reason, "source": "ref"}
                          for r in (next(results) for _ in range(s.n))]
        rec["candidates"] = []
        for c in pool:
            ids = candidate_ids(tok, rec, c["text"], date)
            if ids and len(rec["prompt_ids"]) + len(ids) <= recipe.train.seq_len:
                rec["candidates"].append({"ids": ids, **c})
        for c in rec["samples"] + rec["candidates"]:
            items.append({"messages": rec["messages"], "completion": c["text"],
                          "meta": {**rec["meta"], "finish_reason": c["finish_reason"]}})
            owners.append(c)
    for c, r in zip(owners, reward(items) if items else [], strict=True):
        c["reward"] = float(r)
    pairs = []
    for rec, _ in live:
        rec["ref_rewards"] = [c["reward"] for c in rec["samples"]]
        why = choose_pair(rec, rec["samples"] + rec["candidates"], recipe.pairs)
        if why:
            rec["skipped"] = why
        else:
            pairs.append(rec)
    # reference log-probabilities of the training completions, once, with the training forward pass
    with torch.no_grad(), autocast:
        for i in range(0, len(pairs), max(1, recipe.train.micro_batch)):
            group = pairs[i:i + recipe.train.micro_batch]
            batch = pair_batch([(r["prompt_ids"], r["chosen"], r["rejected"]) for r in group])
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            logps = sequence_logps(engine.model, batch).tolist()
            for r, lc, lr in zip(group, logps[0::2], logps[1::2], strict=True):
                r["chosen"]["ref_logp"], r["rejected"]["ref_logp"] = lc, lr


# --- 3. held-out mean reward ------------------------------------------------------------------------------------------


def mean_reward(model_path, tok, recipe: AlignRecipe, prompts: list[dict], reward, date: str, out: Path,
                device) -> dict:
    """Sample eval_n completions per held-out prompt (fixed seeds) and score them; samples go to `out` (JSONL)."""
    from ..chat import STOP_IDS
    from ..checkpoint import load_model
    from ..infer import Engine, SamplingParams

    s = recipe.sampling
    live = [p for p in prompts if "prompt_ids" in p]
    model = load_model(model_path, dtype=rollout_dtype(recipe.train, device), device=device)
    engine = Engine(model, tokenizer=tok, device=device, cache_gb=s.cache_gb, max_batch=256)
    try:
        params = [SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=0, max_tokens=s.max_tokens,
                                 seed=s.seed * 1_000_000_007 + 999_000_000 + p["index"] * 1000 + j,
                                 stop_token_ids=list(STOP_IDS), repetition_penalty=1.0)
                  for p in live for j in range(s.eval_n)]
        results = engine.generate([p["prompt_ids"] for p in live for _ in range(s.eval_n)], params)
    finally:
        engine.close()
    owners = [p for p in live for _ in range(s.eval_n)]
    items = [{"messages": p["messages"], "completion": r.text, "meta": {**p["meta"], "finish_reason": r.finish_reason}}
             for p, r in zip(owners, results, strict=True)]
    rows = [{"index": p["index"], "completion": r.text, "finish_reason": r.finish_reason, "tokens": len(r.output_ids),
             "reward": float(v)} for p, r, v in zip(owners, results, reward(items), strict=True)]
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    n = max(len(rows), 1)
    return {"mean_reward": sum(r["reward"] for r in rows) / n, "samples": len(rows),
            "ended_turn": sum(r["finish_reason"] == "stop" for r in rows) / n,
            "mean_tokens": sum(r["tokens"] for r in rows) / n}


def evaluate(recipe: AlignRecipe, tok, hf: Path, out: Path, date: str, d: Dist) -> dict | None:
    """eval/summary.json: mean reward on the held-out prompts of π_ref and of the trained policy (rank 0)."""
    from .rewards import build_reward

    if not recipe.data.eval_prompts or not d.main:
        return None
    folder = out / "eval"
    folder.mkdir(exist_ok=True)
    prompts = [rec for rec, _ in load_prompts(tok, recipe.data.eval_prompts, recipe.sampling.max_tokens,
                                              recipe.train.seq_len, date, False)]
    reward = build_reward(recipe.reward, date, d.device)
    try:
        summary = {"prompts": sum("prompt_ids" in p for p in prompts), "reward": dataclasses.asdict(recipe.reward),
                   "loss": recipe.loss.name}
        for name, path in (("reference", recipe.init_from), ("policy", hf)):
            summary[name] = mean_reward(path, tok, recipe, prompts, reward, date, folder / f"{name}.jsonl", d.device)
    finally:
        if hasattr(reward, "close"):
            reward.close()
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    log(d, f"align: held-out mean reward {summary['reference']['mean_reward']:.4f} (reference) -> "
           f"{summary['policy']['mean_reward']:.4f} ({recipe.loss.name})")
    return summary


# --- the run ----------------------------------------------------------------------------------------------------------


def align(recipe: AlignRecipe, out_dir: str | Path, d: Dist | None = None) -> dict:
    """Rollouts (or reuse), QRPO/DPO training on the shared loop, instruct export, held-out evaluation."""
    d = d or init_distributed()
    out = Path(out_dir)
    t, o, lo = recipe.train, recipe.optim, recipe.loss
    torch.manual_seed(t.seed)
    tok = load_tokenizer(recipe.data.tokenizer, recipe.init_from, recipe.model.vocab_size)
    date = run_date(recipe.data.date, out)
    write_run_files(recipe, out, d, {"data": dataclasses.asdict(recipe.data) | {"date": date}})
    folder = Path(recipe.data.rollouts) if recipe.data.rollouts else out / "rollouts"
    if recipe.data.rollouts and not folder.is_dir():
        raise FileNotFoundError(f"[data] rollouts {folder}: no such folder")
    records = read_records(folder) if recipe.data.rollouts else rollouts(recipe, tok, folder, d, date)
    pairs = [(r["prompt_ids"], r["chosen"], r["rejected"]) for _, r in sorted(records.items()) if "chosen" in r]
    skipped = {}
    for r in records.values():
        if "skipped" in r:
            skipped[r["skipped"]] = skipped.get(r["skipped"], 0) + 1
    completions = [c for r in records.values() for c in r.get("samples", []) + r.get("candidates", [])]
    stats = {"prompts": len(records), "pairs": len(pairs), "skipped": skipped,
             "empty_completions": sum(not c["text"].strip() for c in completions),  # scored, never trained on
             "truncated_completions": sum(c["finish_reason"] == "length" for c in completions),
             "ref_mean_reward": _mean([x for r in records.values() for x in r.get("ref_rewards", [])]),
             "chosen_quantile": _mean([p[1]["quantile"] for p in pairs]),
             "rejected_quantile": _mean([p[2]["quantile"] for p in pairs])}
    log(d, f"align: {len(records):,} prompts -> {len(pairs):,} pairs; skipped "
           + (", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none")
           + f"; {stats['empty_completions']} empty and {stats['truncated_completions']} cut-off completions of "
           f"{len(completions):,}; reference samples' mean reward {stats['ref_mean_reward']:.4f}")
    if not pairs:
        raise ValueError(f"align: no training pair (skipped: {skipped}); more samples per prompt or another reward")
    steps = total_steps(t, len(pairs))
    stats["steps"] = steps
    if d.main:
        (out / "align_data.json").write_text(json.dumps(stats, indent=1))

    model = training_model(recipe, d)
    optimizer = make_optimizer(model, o, steps, compile=t.compile)
    source = RowSource(len(pairs), t.batch_size, t.micro_batch, d, t.seed,
                       lambda idx: pair_batch([pairs[i] for i in idx]))

    def loss_fn(model, batch):
        logps = sequence_logps(model, batch)
        if lo.name == "qrpo":
            losses = qrpo_losses(logps, batch["ref_logps"], batch["quantiles"], batch["lengths"], lo.beta,
                                 lo.max_beta or None, lo.length_normalize)
        else:
            n = batch["lengths"]
            losses = dpo_losses(logps[0::2], logps[1::2], batch["ref_logps"][0::2], batch["ref_logps"][1::2],
                                n[0::2], n[1::2], lo.beta, lo.length_normalize)
        return losses.sum(), losses.numel()

    cfg = loop_config(f"align-{lo.name}", out, steps, schedule(o, steps), t, recipe.checkpoint,
                      model.config.flops_per_token)
    result = train(model, optimizer, source, loss_fn, cfg, d)
    if result["step"] < steps:  # stopped by SIGTERM: the checkpoint is saved, the run is not finished
        return result
    hf = export_instruct(model, out / recipe.export.dir, tok, d, recipe.export.dtype)
    del model, optimizer
    gc.collect()
    summary = evaluate(recipe, tok, hf, out, date, d)
    if summary:
        result.update({"eval/reference_reward": summary["reference"]["mean_reward"],
                       "eval/policy_reward": summary["policy"]["mean_reward"]})
    if d.main:
        record_run(out, "align", recipe.init_from, ["align_data.json", "rollouts", "eval"])
    barrier()
    return result


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def run(recipe: str | Path | dict, out_dir: str | Path, *, init_from: str | Path | None = None,
        overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """The Python entry point: an alignment run from a recipe file or dict (as `apertus.train.sft.run`); `init_from`
    is the SFT checkpoint (π_ref and the starting policy). Resumable; returns the instruct checkpoint out_dir/hf."""
    return posttrain_run("align", parse_align_recipe, align, recipe, out_dir, init_from=init_from,
                         overrides=overrides)


def command(args) -> int:
    """`apertus align` (posttrain.add_arguments)."""
    return posttrain_command(args, parse_align_recipe, align)


EXAMPLE = "recipes/align_tiny.toml"


def main(argv: list[str] | None = None) -> int:
    return posttrain_main(argv, "apertus.train.qrpo", parse_align_recipe, align, EXAMPLE)


if __name__ == "__main__":
    import sys

    sys.exit(main())
