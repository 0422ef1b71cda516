"""Evaluation reports: results.json, results.md (a markdown table) and PNG charts, written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..util import atomic_write

PRIMARY = ("acc", "exact_match", "bpb")  # the headline metric of a task, in this order of preference


def primary_metric(r: dict) -> str:
    return next(m for m in PRIMARY if m in r)


def write_json(path: Path, obj) -> None:
    atomic_write(Path(path), lambda p: p.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))


def _fmt(x: float, metric: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.4f}" if metric == "bpb" else f"{100 * x:.1f}"


def markdown(results: dict) -> str:
    """Groups first, then every subtask: value ± stderr beside the chance level (accuracies in %)."""
    lines = [f"# Evaluation of `{results['model']}`", ""]
    for title, table in (("Task groups", results["groups"]), ("Tasks", results["tasks"])):
        if not table:
            continue
        lines += [f"## {title}", "", "| task | metric | value | ± stderr | chance | n |",
                  "|---|---|---:|---:|---:|---:|"]
        for name, r in table.items():
            for m in ("acc", "acc_norm", "acc_bytes", "exact_match", "strict_match", "bpb"):
                if m in r:
                    base = m if m in PRIMARY else primary_metric(r)
                    lines.append(f"| {name} | {m}{' (%)' if base != 'bpb' else ''} | {_fmt(r[m], base)} | "
                                 f"{_fmt(r.get(m + '_stderr'), base)} | {_fmt(r['chance'], base)} | {r['n']} |")
        lines.append("")
    return "\n".join(lines)


def charts(results: dict, out_dir: Path) -> list[Path]:
    """One bar chart per group with several subtasks (per language, error bars = 1 stderr, dashed line = chance),
    and a summary of the groups against chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_group: dict[str, list[str]] = {}
    for name in results["tasks"]:
        group = next((g for g in results["groups"] if name == g or name.startswith(g + "_")), name)
        by_group.setdefault(group, []).append(name)

    def bars(names, rows, title, path):
        metrics = [primary_metric(r) for r in rows]  # the summary mixes acc and exact_match (both in %)
        metric = metrics[0] if len(set(metrics)) == 1 else "score"
        scale = 1 if metric == "bpb" else 100
        vals = [r[m] * scale for r, m in zip(rows, metrics, strict=True)]
        errs = [0 if math.isnan(r.get(m + "_stderr", math.nan)) else r[m + "_stderr"] * scale
                for r, m in zip(rows, metrics, strict=True)]
        order = sorted(range(len(rows)), key=lambda i: vals[i]) if len(rows) > 12 else range(len(rows))
        names, vals, errs = [names[i] for i in order], [vals[i] for i in order], [errs[i] for i in order]
        chance = [rows[i]["chance"] * scale for i in order]
        fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(rows) + 2), 4.5))
        x = range(len(rows))
        ax.bar(x, vals, yerr=errs, color="#4C72B0", ecolor="#333333", capsize=2 if len(rows) < 40 else 0)
        ax.hlines(chance, [i - 0.4 for i in x], [i + 0.4 for i in x], colors="k", linestyles="--", lw=1,
                  label="chance" if metric != "bpb" else "chance: uniform over the vocabulary")
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=90, fontsize=7 if len(rows) > 40 else 9)
        ax.set_ylabel("bits per byte (lower is better)" if metric == "bpb" else
                      "accuracy or exact match (%)" if metric == "score" else f"{metric} (%)")
        ax.set_title(title)
        ax.legend(loc="best")
        fig.tight_layout()
        atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
        plt.close(fig)
        written.append(path)

    for group, names in by_group.items():
        if len(names) > 1:
            short = [n[len(group) + 1:] or n for n in names]
            bars(short, [results["tasks"][n] for n in names], f"{group} — {results['model']}", out_dir / f"{group}.png")
    acc_groups = [g for g, r in results["groups"].items() if primary_metric(r) != "bpb"]
    if acc_groups:
        bars(acc_groups, [results["groups"][g] for g in acc_groups], f"task groups — {results['model']}",
             out_dir / "summary.png")
    return written


def write_report(results: dict, out_dir) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", results)
    md = markdown(results)
    atomic_write(out_dir / "results.md", lambda p: p.write_text(md + "\n", encoding="utf-8"))
    return {"json": out_dir / "results.json", "markdown": out_dir / "results.md",
            "charts": charts(results, out_dir)}
