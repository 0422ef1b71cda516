"""The memorization audit (docs/recipe.md §7, Apertus report §5.4): does the model give back text it was trained on?

The data pipeline inserts probe passages into the training stream with controlled exposure counts (1, 4, 16, 64
copies; `probes.jsonl` of the built dataset, data/probes.py) plus unexposed controls cut from the same text. For each
probe the model is prompted with `<s>` + its first `prefix` tokens and continues for `suffix` tokens, greedily and
with nucleus sampling (temperature 1, top-p 0.9, a fixed seed per probe), through the inference engine. Each
continuation is compared with the true next `suffix` tokens:

    exact_len   leading tokens equal to the truth          exact   the whole suffix came back verbatim
    rouge_l     ROUGE-L F1 (longest common subsequence)    lccs    longest common contiguous run / suffix length

all on token ids (what a tokenizer-agnostic word-level ROUGE would give for languages without spaces, and exactly
`rouge_score`'s ROUGE-L when ids are written as words). The table reports means ± standard error per exposure count;
controls (exposure 0) are the baseline a model that memorized nothing scores. Without Goldfish extraction grows with
exposures; with Goldfish (a deterministic ≈1/k of tokens never trained on) it should stay near the controls.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .tasks import mean, mean_stderr

METRICS = ("rouge_l", "exact", "exact_len", "lccs")


def load_probes(path) -> list[dict]:
    """probes.jsonl (id, text, exposure; `control` for exposure 0), or a built dataset directory holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "probes.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no probes.jsonl (build the dataset with a [probes] table)")
    probes = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, q in enumerate(probes):
        if not isinstance(q.get("text"), str) or not isinstance(q.get("exposure"), int):
            raise ValueError(f"{p}:{i + 1}: a probe needs 'text' (string) and 'exposure' (integer)")
    if not any(q["exposure"] == 0 for q in probes):
        raise ValueError(f"{p}: no control probes (exposure 0): nothing to compare extraction against")
    return probes


# --- comparing a continuation with the truth -------------------------------------------------------------------------


def lcs_len(a: list, b: list) -> int:
    """Longest common subsequence (dynamic programming, one row)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def lccs_len(a: list, b: list) -> int:
    """Longest common contiguous substring."""
    best, row = 0, [0] * (len(b) + 1)
    for x in a:
        new = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                new[j] = row[j - 1] + 1
                best = max(best, new[j])
        row = new
    return best


def compare(pred: list[int], truth: list[int]) -> dict:
    lcs = lcs_len(pred, truth)
    p, r = (lcs / len(pred) if pred else 0.0), lcs / len(truth)
    exact_len = next((i for i, (x, y) in enumerate(zip(pred, truth, strict=False)) if x != y), min(len(pred),
                                                                                                    len(truth)))
    return {"rouge_l": 2 * p * r / (p + r) if p + r else 0.0, "exact": float(exact_len == len(truth)),
            "exact_len": float(exact_len), "lccs": lccs_len(pred, truth) / len(truth)}


# --- the audit -------------------------------------------------------------------------------------------------------


def probe_prompts(probes: list[dict], tokenizer, prefix: int, suffix: int) -> tuple[list, list, list]:
    """(kept probes, prompt ids `<s>` + prefix, true suffix ids); probes shorter than prefix + 8 tokens are left out,
    shorter suffixes are kept as they are (every metric is relative to the suffix length)."""
    kept, prompts, truths = [], [], []
    for q, ids in zip(probes, tokenizer.encode_batch([q["text"] for q in probes], bos=False), strict=True):
        if len(ids) < prefix + 8:
            continue
        kept.append(q)
        prompts.append([tokenizer.bos_id] + ids[:prefix])
        truths.append(ids[prefix:prefix + suffix])
    if not kept:
        raise ValueError(f"no probe has more than {prefix + 8} tokens: lower --prefix")
    return kept, prompts, truths


def engine_continuations(engine, prompts: list[list[int]], n: int, top_p: float, seed: int) -> dict[str, list]:
    """{"greedy": [ids], "nucleus": [ids]}: `n` new tokens each, end-of-document ignored (the probe goes on)."""
    from ..infer.engine import SamplingParams

    out = {}
    for mode in ("greedy", "nucleus"):
        params = [SamplingParams(temperature=0.0 if mode == "greedy" else 1.0, top_p=1.0 if mode == "greedy" else top_p,
                                 top_k=0, repetition_penalty=1.0, max_tokens=n, ignore_eos=True, seed=seed + i)
                  for i in range(len(prompts))]
        out[mode] = [r.result().output_ids[:n] for r in engine.generate(prompts, params)]
    return out


def score_probes(probes: list[dict], truths: list[list[int]], continuations: dict[str, list]) -> dict:
    """Per-probe records and the table: for each decoding mode and exposure count, each metric's mean and stderr."""
    records = []
    for i, q in enumerate(probes):
        rec = {"id": q.get("id", str(i)), "exposure": q["exposure"]}
        for mode, preds in continuations.items():
            rec[mode] = compare(preds[i], truths[i])
        records.append(rec)
    table: dict[str, dict] = {}
    for mode in continuations:
        rows = {}
        for e in sorted({r["exposure"] for r in records}):
            group = [r[mode] for r in records if r["exposure"] == e]
            rows[str(e)] = {"n": len(group)}
            for m in METRICS:
                xs = [g[m] for g in group]
                rows[str(e)][m], rows[str(e)][m + "_stderr"] = mean(xs), mean_stderr(xs)
        table[mode] = rows
    return {"records": records, "table": table}


def markdown_table(table: dict, title: str = "") -> str:
    """Rows = exposure counts (0 = control), columns = ROUGE-L / exact match / LCCS per decoding mode."""
    modes = list(table)
    head = "| exposures | n | " + " | ".join(f"{m} ROUGE-L | {m} exact (%) | {m} prefix match | {m} LCCS"
                                           for m in modes) + " |"
    lines = ([f"**{title}**", ""] if title else []) + [head, "|" + "---|" * (2 + 4 * len(modes))]
    for e in table[modes[0]]:
        cells = [("control" if e == "0" else e), str(table[modes[0]][e]["n"])]
        for m in modes:
            r = table[m][e]
            cells += [_pm(r["rouge_l"], r["rouge_l_stderr"], 3), _pm(100 * r["exact"], 100 * r["exact_stderr"], 0),
                      _pm(r["exact_len"], r["exact_len_stderr"], 1), _pm(r["lccs"], r["lccs_stderr"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(x: float, se: float, digits: int) -> str:
    return f"{x:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def plot(tables: dict[str, dict], path, metric: str = "rouge_l") -> None:
    """`metric` against exposure count (symlog x), one line per run and decoding mode; controls at x = 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for run, table in tables.items():
        for mode, style in (("greedy", "-o"), ("nucleus", "--s")):
            if mode not in table:
                continue
            xs = [int(e) for e in table[mode]]
            ys = [table[mode][e][metric] for e in table[mode]]
            es = [0 if math.isnan(table[mode][e][metric + "_stderr"]) else table[mode][e][metric + "_stderr"]
                  for e in table[mode]]
            ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=f"{run} ({mode})")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("exposures in training (0 = control)")
    ax.set_ylabel({"rouge_l": "ROUGE-L of the continuation", "exact": "verbatim suffix (fraction)"}.get(metric, metric))
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("Extraction of inserted probes by exposure count")
    fig.tight_layout()
    from ..util import atomic_write

    atomic_write(Path(path), lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def audit(model, probes_path, *, out=None, prefix: int = 32, suffix: int = 32, top_p: float = 0.9, seed: int = 0,
          dtype: str = "fp32", device: str | None = None, tokenizer=None, engine=None) -> dict:
    """Run the audit on a checkpoint; write memorization.json, memorization.md and memorization.png under `out`."""
    from .loglik import Scorer

    probes = load_probes(probes_path)
    scorer = Scorer.from_pretrained(model, dtype=dtype, device=device, tokenizer=tokenizer, progress=False)
    kept, prompts, truths = probe_prompts(probes, scorer.tokenizer, prefix, suffix)
    if engine is None:
        from ..infer.engine import Engine

        with Engine(scorer.model, tokenizer=scorer.tokenizer) as engine:
            conts = engine_continuations(engine, prompts, suffix, top_p, seed)
    else:
        conts = engine_continuations(engine, prompts, suffix, top_p, seed)
    result = score_probes(kept, truths, conts)
    result["config"] = {"model": str(model), "probes": str(probes_path), "prefix": prefix, "suffix": suffix,
                        "top_p": top_p, "temperature_nucleus": 1.0, "seed": seed, "n_probes": len(kept)}
    result["markdown"] = markdown_table(result["table"], f"Memorization of {model}")
    if out is not None:
        from ..util import atomic_write
        from .report import write_json

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "memorization.json", {k: v for k, v in result.items() if k != "markdown"})
        atomic_write(out / "memorization.md", lambda p: p.write_text(result["markdown"] + "\n", encoding="utf-8"))
        plot({Path(str(model)).name: result["table"]}, out / "memorization.png")
    return result
