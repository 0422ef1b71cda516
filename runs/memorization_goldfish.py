"""The Goldfish experiment: two tiny pretraining runs, identical except Goldfish on (k = h = 50, as Apertus) or off,
on the embedded corpus with memorization probes inserted, then the memorization audit of both.

    python runs/memorization_goldfish.py [--out runs/memorization] [--steps 300] [--host-docs 1000]

Steps (each skipped when its output exists, so a stopped run resumes):
  1. an 8k byte-level BPE tokenizer trained on UDHR (apertus tokenizer train; FLORES stays unseen)
  2. a dataset: UDHR translations with Shakespeare passages inserted 1, 4, 16 and 64 times each, plus never-seen
     controls from the same text (apertus data build; the probes and their counts land in probes.jsonl)
  3. two pretraining runs of the tiny preset, same seed and data order, --set train.goldfish_k=50 or 0
     (apertus train, then apertus export to a Hugging Face checkpoint)
  4. for each: the memorization audit (apertus eval memorization: greedy and nucleus continuations of probe
     prefixes against the true text) and FLORES bits-per-byte (does Goldfish cost quality?)
  5. report.md: the table of extraction by exposure count for both runs, memorization.png
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
    ap.add_argument("--per-exposure", type=int, default=8, help="probes per exposure count (controls: twice that)")
    ap.add_argument("--prefix", type=int, default=50, help="prompt tokens (>= Goldfish h: the suffix is hashed on "
                    "the probe's own tokens)")
    ap.add_argument("--suffix", type=int, default=64)
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
    manifest = json.loads((data / "manifest.json").read_text())
    train_tokens = sum(s["tokens"] for s in manifest.get("stages", []) if s.get("tokens")) or None

    runs = {}
    for name, k in (("goldfish-off", 0), ("goldfish-on", 50)):
        run, hf = out / name, out / f"{name}-hf"
        if not (hf / "config.json").exists():
            sets = [f"data.dataset={data}", f"train.steps={args.steps}", f"train.goldfish_k={k}", *args.set]
            apertus("train", ROOT / "recipes" / "tiny.toml", "--out", run, *sum((["--set", s] for s in sets), []))
            apertus("export", run, "--out", hf, "--dtype", "fp32")
        audit = out / f"{name}-audit"
        if not (audit / "memorization.json").exists():
            apertus("eval", "memorization", hf, "--probes", data, "--prefix", args.prefix, "--suffix", args.suffix,
                    "--out", audit)
        bpb = out / f"{name}-eval"
        if not (bpb / "results.json").exists():
            apertus("eval", hf, "--tasks", "flores_bpb", "--langs", "eng_Latn,deu_Latn,fra_Latn,ita_Latn,rus_Cyrl,"
                    "zho_Hans,arb_Arab,hin_Deva,swh_Latn,ell_Grek", "--out", bpb)
        runs[name] = {"audit": json.loads((audit / "memorization.json").read_text()),
                      "bpb": json.loads((bpb / "results.json").read_text())["groups"]["flores_bpb"]}

    lines = [f"# Goldfish on/off: extraction of inserted probes ({args.steps} steps of the tiny preset, "
             f"prefix {args.prefix} / suffix {args.suffix} tokens)", "",
             f"Dataset: {args.host_docs} GSM8K problems + Shakespeare probes; training tokens per run: "
             f"{train_tokens or 'see the train logs'}.", ""]
    for name, r in runs.items():
        lines += [M.markdown_table(r["audit"]["table"], name), "",
                  f"FLORES bits per byte (10 languages): {r['bpb']['bpb']:.4f} ± {r['bpb']['bpb_stderr']:.4f}", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    M.plot({name: r["audit"]["table"] for name, r in runs.items()}, out / "memorization.png")
    M.plot({name: r["audit"]["table"] for name, r in runs.items()}, out / "memorization_exact.png", metric="exact")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
