"""The Goldfish experiment: two tiny pretraining runs, identical except Goldfish on (k = h = 50, as Apertus) or off,
on embedded data with memorization probes inserted, then the memorization audit of both.

    python runs/memorization_goldfish.py [--out runs/memorization] [--steps 300] [--host-docs 1000]

Steps (each skipped when its output exists, so a stopped run resumes):
  1. an 8k byte-level BPE tokenizer trained on UDHR (apertus tokenizer train)
  2. a dataset: GSM8K problems (English text a CPU-sized model learns in minutes) with 400-character Shakespeare
     passages inserted 1, 4, 16 and 64 times each, plus never-inserted controls from the same play text
     (apertus data build; the probes and their counts land in probes.jsonl)
  3. two pretraining runs of the tiny recipe scaled to a 2-layer model, same seed and data order,
     --set train.goldfish_k=50 or 0 (apertus train, then apertus export to a Hugging Face checkpoint)
  4. for each: the memorization audit (apertus eval memorization: greedy and nucleus continuations of probe
     prefixes against the true text) and bits per byte on held-out FLORES English (what Goldfish costs)
  5. report.md: the table of extraction by exposure count for both runs; memorization.png, memorization_exact.png
"""

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from apertus.config import data_root  # noqa: E402
from apertus.eval import memorization as M  # noqa: E402


def apertus(*args):
    cmd = [sys.executable, "-m", "apertus.cli", *map(str, args)]
    print("$ apertus " + " ".join(map(str, args)), flush=True)
    subprocess.run(cmd, check=True)


def data_recipe(tokenizer: Path, host_docs: int, chars: int, per_exposure: int) -> str:
    data = data_root()
    return textwrap.dedent(f"""\
        # written by runs/memorization_goldfish.py: GSM8K problems with Shakespeare probes inserted
        name = "goldfish-probes"

        [dataset]
        tokenizer = "{tokenizer}"
        seed = 0
        shard_tokens = 1_048_576
        val_fraction = 0.0
        val_min_docs = 10
        max_chars = 1_000_000

        [executor]
        kind = "local"
        tasks = 1               # one reader task: `limit` is then the number of UDHR files
        workers = 1

        [[sources]]
        name = "gsm8k"
        reader = "jsonl"
        path = "{data}/gsm8k/train.jsonl"
        template = "{{question}}\\n\\n{{answer}}"
        language = "eng_Latn"
        limit = {host_docs}
        kind = "math"

        [probes]
        text = "{data}/tinyshakespeare/input.txt"
        into = "gsm8k"
        exposures = [1, 4, 16, 64]
        per_exposure = {per_exposure}
        controls = {2 * per_exposure}
        chars = {chars}

        [[stages]]
        name = "main"
        sources = {{ gsm8k = 1.0 }}
        """)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/memorization")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of each run")
    ap.add_argument("--host-docs", type=int, default=1000, help="GSM8K problems that carry the probes")
    ap.add_argument("--chars", type=int, default=400, help="characters per probe passage")
    ap.add_argument("--per-exposure", type=int, default=4, help="probes per exposure count (controls: twice that)")
    ap.add_argument("--prefix", type=int, default=50, help="prompt tokens (>= Goldfish h: the suffix is hashed on "
                    "the probe's own tokens)")
    ap.add_argument("--suffix", type=int, default=128, help="generated tokens compared with the probe (~200 long)")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="tokens per optimizer step")
    ap.add_argument("--seq-len", type=int, default=1024, help="row length. Goldfish never drops the first h-1 "
                    "labels of a row (their hash context is cut), so a probe copy that lands there is fully trained: "
                    "about (h-1)/seq_len of exposures leak (19%% with 256-token rows, 5%% with 1024)")
    ap.add_argument("--audit-step", type=int, help="audit the checkpoint of this step (default: the end of the run)")
    ap.add_argument("--set", action="append", default=[], help="extra training overrides (SECTION.KEY=VALUE)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tok = out / "tokenizer"
    if not (tok / "tokenizer.json").exists():
        apertus("tokenizer", "train", "--corpus", "udhr", "--vocab-size", 8192, "--out", tok)
    data = out / "data"
    if not (data / "manifest.json").exists():
        (out / "data.toml").write_text(data_recipe(tok / "tokenizer.json", args.host_docs, args.chars,
                                                  args.per_exposure))
        apertus("data", "build", out / "data.toml", "--out", data)
    step = args.audit_step or args.steps
    epoch_tokens = _count_tokens(data)
    epochs = step * args.batch_tokens / epoch_tokens  # each probe copy is seen once per epoch

    runs = {}
    for name, k in (("goldfish-off", 0), ("goldfish-on", 50)):
        run, hf = out / name, out / (f"{name}-hf" + (f"-step{step}" if args.audit_step else ""))
        ckpt = run / "checkpoints" / f"step_{step:08d}"
        if not (hf / "config.json").exists():
            if not (ckpt / "state.json").exists():
                sets = [f"data.dataset={data}", f"train.goldfish_k={k}", *training_overrides(args), *args.set]
                apertus("train", ROOT / "recipes" / "tiny.toml", "--out", run,
                        *sum((["--set", s] for s in sets), []))
            apertus("export", ckpt, "--out", hf, "--dtype", "fp32")
        audit = out / f"{hf.name}-audit-{args.prefix}-{args.suffix}"
        if not (audit / "memorization.json").exists():
            apertus("eval", "memorization", hf, "--probes", data, "--prefix", args.prefix, "--suffix", args.suffix,
                    "--out", audit)
        held_out = out / f"{hf.name}-eval"
        if not (held_out / "results.json").exists():  # never trained on
            apertus("eval", hf, "--tasks", "flores_bpb_eng_Latn", "--out", held_out)
        runs[name] = {"audit": json.loads((audit / "memorization.json").read_text()),
                      "bpb": json.loads((held_out / "results.json").read_text())["tasks"]["flores_bpb_eng_Latn"],
                      "dropped": dropped_tokens(hf, data, args.prefix, args.suffix)}

    lines = [f"# Goldfish on/off: extraction of inserted probes (prefix {args.prefix} / suffix {args.suffix} "
             "tokens)", "",
             f"Two runs of the tiny recipe ({args.steps} steps of {args.batch_tokens} tokens in {args.seq_len}-token "
             f"rows, {MODEL}; audited at step {step}), identical but for Goldfish (k = h = 50 vs off), on "
             f"{args.host_docs} GSM8K problems "
             "with Shakespeare probes inserted; "
             f"{epochs:.1f} epochs, so a probe inserted e times was seen about {epochs:.1f}·e times.", ""]
    for name, r in runs.items():
        lines += [M.markdown_table(r["audit"]["table"], name), "",
                  f"FLORES English bits per byte: {r['bpb']['bpb']:.4f} ± {r['bpb']['bpb_stderr']:.4f}", ""]
    lines += ["**Goldfish-dropped positions of the audited suffixes** (the hash of the 50 probe tokens ending at a "
              "position says whether Goldfish drops it; teacher-forced: is the true token the model's argmax?)", "",
              "| exposures | suffix tokens | dropped by the hash | " + " | ".join(
                  f"{n}: argmax right on dropped | {n}: argmax right on all" for n in runs) + " |",
              "|---|---|---|" + "---|---|" * len(runs)]
    for e, row in runs["goldfish-off"]["dropped"].items():
        cells = [f"{d['right_dropped']}/{row['dropped']} | {d['right_all'] / row['tokens']:.2f}"
                 for d in (r["dropped"][e] for r in runs.values())]
        lines.append(f"| {e or 'control'} | {row['tokens']} | {row['dropped']} | " + " | ".join(cells) + " |")
    lines.append("")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    tables = {name: r["audit"]["table"] for name, r in runs.items()}
    M.plot(tables, out / "memorization.png")
    M.plot(tables, out / "memorization_exact.png", metric="exact")
    print("\n".join(lines))


MODEL = "2 layers, hidden 128, 8k vocabulary"


def training_overrides(args) -> list[str]:
    """The tiny recipe scaled to a CPU budget: a 2-layer model, 8k-token batches in one micro-batch."""
    return [f"train.steps={args.steps}", f"train.global_batch_tokens={args.batch_tokens}",
            f"train.seq_len={args.seq_len}", f"train.micro_batch={max(1, args.batch_tokens // args.seq_len)}",
            "train.log_every=10", "checkpoint.every=100", "eval.every=0",
            f"schedule.warmup_tokens={args.steps // 10 * args.batch_tokens}",
            f"schedule.cooldown_tokens={args.steps // 5 * args.batch_tokens}",
            f"optim.t_alpha={args.steps}", f"optim.t_beta3={args.steps}",
            "model.hidden_size=128", "model.num_hidden_layers=2", "model.intermediate_size=512",
            "model.num_attention_heads=2", "model.num_key_value_heads=1"]


def dropped_tokens(hf: Path, data: Path, prefix: int, suffix: int) -> dict:
    """Per exposure count: the audited suffix positions, how many the Goldfish hash drops, and how many of those
    (and of all) the model predicts right given the true text before them (teacher forcing)."""
    import torch

    from apertus.checkpoint import load_model
    from apertus.tokenizer import Tokenizer
    from apertus.train.loss import goldfish_mask

    model = load_model(hf, dtype="fp32", device="cpu").eval()
    tok = Tokenizer.from_file(hf)
    rows: dict[int, dict] = {}
    for p in M.load_probes(data):
        ids = torch.tensor(tok.encode(p["text"], bos=False)[:prefix + suffix])
        drop = ~goldfish_mask(ids)[prefix:]  # the hash window of a suffix token lies inside the probe (prefix >= h)
        with torch.no_grad():
            right = (model(ids[None, :-1])[0].argmax(-1) == ids[1:])[prefix - 1:]
        r = rows.setdefault(p["exposure"], {"tokens": 0, "dropped": 0, "right_dropped": 0, "right_all": 0})
        r["tokens"] += len(drop)
        r["dropped"] += int(drop.sum())
        r["right_dropped"] += int((right & drop).sum())
        r["right_all"] += int(right.sum())
    return dict(sorted(rows.items()))


def _count_tokens(data: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.read_table(data / "documents.parquet", columns=["n_tokens"])["n_tokens"].to_numpy().sum())


if __name__ == "__main__":
    main()
