"""Post-training on CPU, end to end, for the README: SFT on GSM8K in the Apertus chat format, then QRPO and the
length-normalised DPO baseline on the same rollouts, compared by the mean rule-based reward on held-out questions.

    python runs/posttrain_experiment.py --out runs/posttrain-exp --init runs/tiny-hf   # the tiny pretrained model
    python runs/posttrain_experiment.py --out runs/posttrain-exp-scratch --scratch     # from scratch, GSM8K BPE
    python runs/posttrain_experiment.py --out runs/posttrain-exp-scratch --scratch --conversations 1500 \
        --prompts 192 --eval 64          # the run of runs/posttrain_results.md (16 min on 2 busy cores)

Runs recipes/sft_tiny.toml and recipes/align_tiny.toml with the overrides below (more data, longer training), writes
results.json and posttrain.png (loss curves; held-out reward, exact answers, format, ended turns, answer length).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from apertus import cli  # noqa: E402
from apertus.train.chat_data import read_source  # noqa: E402
from apertus.train.rewards import ends_turn, gsm8k_correct, gsm8k_format  # noqa: E402

SYSTEM = "Solve the problem."


def run(argv: list[str]):
    print("$ apertus " + " ".join(argv), flush=True)
    if cli.main(argv) != 0:
        sys.exit(f"failed: apertus {' '.join(argv)}")


def breakdown(eval_jsonl: Path, prompts: list[dict]) -> dict:
    rows = [json.loads(line) for line in eval_jsonl.read_text().splitlines()]
    out = {"mean_reward": 0.0, "correct": 0.0, "format": 0.0, "ended_turn": 0.0, "tokens": 0.0}
    for r in rows:
        meta = {**prompts[r["index"]]["meta"], "finish_reason": r["finish_reason"]}
        out["mean_reward"] += r["reward"]
        out["correct"] += gsm8k_correct([], r["completion"], meta)
        out["format"] += gsm8k_format([], r["completion"], meta)
        out["ended_turn"] += ends_turn([], r["completion"], meta)
        out["tokens"] += r["tokens"]
    return {k: v / len(rows) for k, v in out.items()} | {"samples": len(rows)}


def plot(out: Path, results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, ax in (("sft", axes[0]), ("qrpo", axes[1]), ("dpo", axes[1])):
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        ax.plot([r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r], label=name)
        val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
        if val:
            ax.plot(*zip(*val, strict=True), "o", label=f"{name} held-out")
    axes[0].set(title="SFT loss (assistant tokens)", xlabel="step", ylabel="nats/token")
    axes[1].set(title="alignment loss", xlabel="step", yscale="log")
    for ax in axes[:2]:
        ax.legend()
        ax.grid(alpha=0.3)
    keys = ["mean_reward", "correct", "format", "ended_turn"]
    names = ["sft", "qrpo", "dpo"]
    for i, n in enumerate(names):
        axes[2].bar([k + (i - 1) * 0.27 for k in range(len(keys))], [results[n][k] for k in keys], width=0.27,
                    label=f"{n} ({results[n]['tokens']:.0f} tokens)")
    axes[2].set_xticks(range(len(keys)), ["mean reward", "exact answer", "#### format", "ended turn"])
    axes[2].set(title=f"held-out GSM8K ({results['sft']['samples']} samples, same seeds)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "posttrain.png", dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/posttrain-exp")
    ap.add_argument("--init", default="runs/tiny-hf", help="pretrained Hugging Face checkpoint with tokenizer.json")
    ap.add_argument("--scratch", action="store_true", help="tiny preset from scratch, a 4k BPE trained on GSM8K")
    ap.add_argument("--conversations", type=int, default=2000)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--eval", type=int, default=64)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sft = ["--set", f'data.sources=[{{format="gsm8k", path="gsm8k/train.jsonl", limit={args.conversations}, '
                    f'system="{SYSTEM}"}}]', "--set", f"train.epochs={args.epochs}"]
    if args.scratch:
        import posttrain_helpers

        posttrain_helpers.gsm8k_tokenizer(out / "tok")
        sft += ["--set", 'model.init_from=""', "--set", 'model.preset="tiny"', "--set", "model.vocab_size=4096",
                "--set", f"data.tokenizer={out / 'tok'}"]
    else:
        sft += ["--set", f"model.init_from={args.init}"]
    run(["sft", "recipes/sft_tiny.toml", "--out", str(out / "sft")] + sft)
    prompts = (f'[{{format="gsm8k", path="gsm8k/train.jsonl", skip={args.conversations}, limit={args.prompts}, '
               f'system="{SYSTEM}"}}]')
    evals = f'[{{format="gsm8k", path="gsm8k/test.jsonl", limit={args.eval}, system="{SYSTEM}"}}]'
    align = ["--set", f"model.init_from={out / 'sft' / 'hf'}", "--set", f"data.prompts={prompts}",
             "--set", f"data.eval_prompts={evals}", "--set", "sampling.eval_n=4"]
    run(["align", "recipes/align_tiny.toml", "--out", str(out / "qrpo")] + align)
    run(["align", "recipes/align_tiny.toml", "--out", str(out / "dpo"), "--set", 'loss.name="dpo"',
         "--set", f"data.rollouts={out / 'qrpo' / 'rollouts'}"] + align)
    eval_prompts = list(read_source({"format": "gsm8k", "path": "gsm8k/test.jsonl", "limit": args.eval}))
    results = {"sft": breakdown(out / "qrpo" / "eval" / "reference.jsonl", eval_prompts),
               "qrpo": breakdown(out / "qrpo" / "eval" / "policy.jsonl", eval_prompts),
               "dpo": breakdown(out / "dpo" / "eval" / "policy.jsonl", eval_prompts),
               "rollouts": json.loads((out / "qrpo" / "align_data.json").read_text()),
               "sft_data": json.loads((out / "sft" / "sft_data.json").read_text())}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(out, results)
    for n in ("sft", "qrpo", "dpo"):
        r = results[n]
        print(f"{n:>5}: mean reward {r['mean_reward']:.3f} | exact answer {r['correct']:.3f} | format "
              f"{r['format']:.3f} | ended turn {r['ended_turn']:.3f} | {r['tokens']:.0f} tokens")
    print(f"wrote {out / 'results.json'} and {out / 'posttrain.png'}")


if __name__ == "__main__":
    main()
