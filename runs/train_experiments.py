"""Pretraining experiments on the embedded corpus, for the README: the tiny preset's learning curve, AdEMAMix vs
AdamW at equal tokens, and Goldfish against verbatim memorisation of passages seen many times.

    python runs/train_experiments.py --out runs/train-experiments [--steps 150] [--only ablation,goldfish]
        [--grid "ademamix:1e-3,3e-3;adamw:3e-3,1e-2"]

Text: tinyshakespeare speeches + UDHR articles (de, fr, it, rm) tokenised with the real Apertus tokenizer, the 8,188
most frequent tokens kept (the `tiny` preset's 8,192-entry vocabulary), held-out speeches/articles for validation.
Writes results.json and one PNG per experiment.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import train_data  # noqa: E402

from apertus.checkpoint import load_model  # noqa: E402
from apertus.train.checkpointing import export_checkpoint  # noqa: E402
from apertus.train.distributed import Dist  # noqa: E402
from apertus.train.pretrain import pretrain  # noqa: E402
from apertus.train.recipe import parse_recipe  # noqa: E402

SEQ, ROWS = 256, 16
COMPILE = True


def recipe(steps: int, **over) -> dict:
    t = {"seq_len": SEQ, "global_batch_tokens": SEQ * ROWS, "micro_batch": ROWS, "steps": steps, "dtype": "bf16",
         "grad_clip": 1.0, "goldfish_k": 50, "goldfish_h": 50, "compile": COMPILE, "log_every": 25}
    t.update(over.pop("train", {}))
    o = {"name": "ademamix", "lr": 3e-3, "min_lr": 3e-4, "betas": [0.9, 0.999, 0.999], "alpha": 8.0,
         "t_alpha": steps, "t_beta3": steps, "weight_decay": 0.1}
    o.update(over.pop("optim", {}))
    return {"model": {"preset": "tiny"}, "train": t, "optim": o,
            "schedule": {"warmup_tokens": SEQ * ROWS * steps // 10, "cooldown_tokens": SEQ * ROWS * steps // 5},
            "eval": {"every": max(1, steps // 5)}}


def run(name: str, table: dict, out: Path, docs=None) -> dict:
    c = train_data.corpus(8192)
    langs = [k for k in ("en", "de", "fr") if sum(map(len, c.val[k])) > SEQ + 1]  # UDHR val is short for long rows
    val = train_data.val_batches(SEQ, ROWS, 4, langs=langs, c=c)
    result = pretrain(parse_recipe(table), out / name, Dist(), make_loader=train_data.make_loader(docs=docs or c.train),
                      val_batches=val, token_bytes=c.token_bytes)
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return {"final": {k: v for k, v in result.items() if k.startswith(("val/", "loss", "tokens"))}, "curve": rows}


def unigram_baseline() -> float:
    c = train_data.corpus(8192)
    counts = torch.bincount(torch.tensor([t for d in c.train for t in d[1:]]), minlength=c.vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    val = train_data.val_batches(SEQ, ROWS, 4, langs=("en",), c=c)["en"]
    return torch.cat([-logp[b["labels"][b["loss_mask"]]] for b in val]).mean().item()


def plot_curves(runs: dict, png: Path, title: str, baseline: float | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, r) in enumerate(runs.items()):
        train = [(x["tokens"], x["loss"]) for x in r["curve"] if "loss" in x]
        val = [(x["tokens"], x["val/en/loss"]) for x in r["curve"] if "val/en/loss" in x]
        k = 10  # moving average of the training loss
        sm = [sum(v for _, v in train[max(0, j - k + 1):j + 1]) / len(train[max(0, j - k + 1):j + 1])
              for j in range(len(train))]
        ax.plot([t for t, _ in train], sm, color=f"C{i}", lw=1, alpha=0.6, label=f"{name} train (avg of 10)")
        ax.plot(*zip(*val, strict=True), color=f"C{i}", marker="o", ms=4, label=f"{name} held-out en")
    if baseline:
        ax.axhline(baseline, color="gray", ls="--", lw=1, label="unigram baseline (held-out en)")
    ax.set(xlabel="tokens", ylabel="loss (nats/token)", title=title, ylim=(None, (baseline or 8) + 1.5))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=130)
    plt.close(fig)


@torch.no_grad()
def greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(n):
        nxt = model(ids)[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


def memorisation(model, passages: list[list[int]], prefix: int, n: int) -> dict:
    """Greedy continuation of each passage's first `prefix` tokens: the fraction of the next n tokens reproduced
    exactly (position by position) and the length of the verbatim run before the first mismatch."""
    exact, runs = [], []
    for p in passages:
        out, ref = greedy(model, p[:prefix], n), p[prefix:prefix + n]
        same = [a == b for a, b in zip(out, ref, strict=True)]
        exact.append(sum(same) / n)
        runs.append(same.index(False) if False in same else n)
    return {"exact_fraction": sum(exact) / len(exact), "verbatim_run": sum(runs) / len(runs)}


def goldfish_experiment(out: Path, steps: int, repeats: int) -> dict:
    """16 long speeches are taken out of the training documents; 8 of them (probes) are put back `repeats` times
    each, 8 (controls) never. After training, how much of each passage does greedy decoding reproduce from its first
    32 tokens?"""
    c = train_data.corpus(8192)
    long = [i for i, d in enumerate(c.train) if len(d) >= 130][:16]
    probes, controls = [c.train[i][:130] for i in long[:8]], [c.train[i][:130] for i in long[8:]]
    docs = [d for i, d in enumerate(c.train) if i not in set(long)] + [p for p in probes for _ in range(repeats)]
    results = {}
    for name, k in (("standard loss", 0), ("Goldfish k=50", 50), ("Goldfish k=4", 4)):
        tag = f"goldfish-k{k}"
        r = run(tag, recipe(steps, train={"goldfish_k": k}, optim={"lr": 1e-3, "min_lr": 1e-4}), out, docs=docs)
        model = load_model(export_checkpoint(out / tag, out / f"{tag}-hf", dtype="fp32")).eval()
        results[name] = {"probes": memorisation(model, probes, 32, 96),
                         "unseen controls": memorisation(model, controls, 32, 96),
                         "val/en/loss": r["final"].get("val/en/loss")}
        print(name, results[name], flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    names = list(results)
    for ax, metric, label in ((axes[0], "exact_fraction", "tokens reproduced exactly (of 96)"),
                              (axes[1], "verbatim_run", "verbatim run before first error (tokens)")):
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [results[n]["probes"][metric] for n in names], 0.4,
               label=f"probes seen {repeats}x")
        ax.bar([i + 0.2 for i in x], [results[n]["unseen controls"][metric] for n in names], 0.4,
               label="unseen controls")
        ax.set_xticks(list(x), names, fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Goldfish vs memorisation: 8 passages repeated {repeats}x in the data ({steps} steps of 4,096 "
                 f"tokens, rows of {SEQ}), greedy continuation of 32-token prefixes", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "goldfish.png", dpi=130)
    plt.close(fig)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/train-experiments")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=32)
    ap.add_argument("--only", default="ablation,goldfish")
    ap.add_argument("--eager", action="store_true", help="without torch.compile")
    ap.add_argument("--seq", type=int, default=256, help="sequence length (rows per step: 4096 tokens / seq)")
    ap.add_argument("--grid", default="ademamix:1e-3,3e-3;adamw:3e-3,1e-2", help="optimizer:lr,lr;... (ablation)")
    args = ap.parse_args()
    global COMPILE, SEQ, ROWS
    COMPILE, SEQ, ROWS = not args.eager, args.seq, 4096 // args.seq
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_file = out / "results.json"
    results = json.loads(res_file.read_text()) if res_file.exists() else {}
    only = args.only.split(",")
    baseline = unigram_baseline()
    results["unigram_baseline_en"] = baseline
    if "ablation" in only:  # the first run (the recipe's own settings) is also the learning curve
        runs = {}
        grid = [(opt, [float(x) for x in lrs.split(",")]) for opt, lrs in
                (part.split(":") for part in args.grid.split(";"))]
        for opt, lrs in grid:
            for lr in lrs:
                name = f"{opt} lr {lr:g}"
                runs[name] = run(f"{opt}-{lr:g}-{args.steps}", recipe(args.steps, optim={
                    "name": opt, "lr": lr, "min_lr": lr / 10}), out)
                print(name, runs[name]["final"], flush=True)
        first = next(iter(runs))
        plot_curves({f"tiny preset, {first}, Goldfish k=50": runs[first]}, out / "learning.png",
                    f"tiny preset ({args.steps} steps of {SEQ * ROWS:,} tokens)", baseline)
        plot_curves(runs, out / f"ablation-{args.steps}.png", f"AdEMAMix vs AdamW at equal tokens ({args.steps} "
                    f"steps of {SEQ * ROWS:,} tokens)", baseline)
        results.setdefault("ablation", {}).update({f"{k}, {args.steps} steps": v["final"] for k, v in runs.items()})
        res_file.write_text(json.dumps(results, indent=1))
    if "goldfish" in only:
        results["goldfish"] = goldfish_experiment(out, args.steps, args.repeats)
        res_file.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
