"""report.md of a speedrun directory (`apertus report RUN_DIR`): read what the stages wrote, draw, link.

Everything is read from the run's files (speedrun.json, the dataset manifest, fertility.json, metrics.jsonl, eval
results, chats.json), so the report can be regenerated at any time, also for a partial run.
"""

from __future__ import annotations

import json
import math
import platform
import re
from importlib import metadata
from pathlib import Path

from .util import atomic_write, atomic_write_text, hms, read_jsonl

PACKAGES = ("apertus", "torch", "transformers", "tokenizers", "datatrove", "gguf", "safetensors")


def _read(path: Path, default=None):
    return json.loads(path.read_text()) if path.is_file() else default


def _system() -> list[str]:
    from .compliance.manifest import hardware

    hw = hardware()
    versions = []
    for pkg in PACKAGES:
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return [f"- Python {platform.python_version()} on {hw['platform']}",
            f"- CPU: {hw['cpu']} ({hw['cpu_count']} logical cores, torch uses {hw['torch_threads']} threads), "
            f"{hw['memory_gib']} GiB memory" + (f"; accelerators: {', '.join(hw['accelerators'])}"
                                                 if hw["accelerators"] else ""),
            "- " + ", ".join(versions)]


def total_seconds(state: dict) -> float:
    """The seconds of every finished stage of a speedrun.json state, added up."""
    return sum(r["seconds"] for r in state.get("stages", {}).values())


def _stage_table(state: dict) -> list[str]:
    rows = ["| stage | time (m:s) | tokens | notes |", "|---|---:|---:|---|"]
    notes = {"tokenizer": lambda r: f"vocabulary {r.get('vocab_size', 0):,}, trained on "
                                    f"{r.get('bytes', 0) / 1e6:.1f} MB",
             "data": lambda r: "tokens in the built shards",
             "pretrain": lambda r: "tokens trained on", "sft": lambda r: "tokens trained on (packed rows)",
             "align": lambda r: "tokens of the preference pairs", "chat": lambda r: "tokens generated"}
    for name, r in state.get("stages", {}).items():
        note = notes.get(name, lambda r: "")(r)
        rows.append(f"| {name} | {hms(r['seconds'])} | {r.get('tokens', 0):,} | {note} |")
    rows.append(f"| **total** | **{hms(total_seconds(state))}** | | |")
    return rows


def _fertility(run: Path) -> list[str]:
    from .tokenizer_eval import FERTILITY_LANGS

    res = _read(run / "tokenizer" / "fertility" / "fertility.json")
    if not res:
        return ["(no tokenizer stage yet)"]
    names = list(res)
    lines = ["Tokens per word and per UTF-8 byte on the held-out FLORES-200 test sentences (never trained on); the "
             "premium is the token count relative to English on the same (parallel) sentences.", "",
             "| tokenizer | vocabulary | languages | median tokens/word | mean tokens/byte | median premium vs eng |",
             "|---|---:|---:|---:|---:|---:|"]
    for n in names:
        s = res[n]["summary"]
        lines.append(f"| {n} | {s['vocab_size']:,} | {s['languages']} | {s['median_tokens_per_word']:.2f} | "
                     f"{s['mean_tokens_per_byte']:.3f} | {s.get('median_premium', float('nan')):.2f} |")
    lines += ["", "| language | " + " | ".join(f"{n} tokens/word · tokens/byte" for n in names) + " |",
              "|---|" + "---:|" * len(names)]
    for lang in FERTILITY_LANGS:
        if lang in res[names[0]]["languages"]:
            cells = [f"{res[n]['languages'][lang]['tokens_per_word']:.2f} · "
                     f"{res[n]['languages'][lang]['tokens_per_byte']:.3f}" for n in names]
            lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    return lines + ["", "![fertility by script](tokenizer/fertility/fertility.png)"]


def plot_losses(run: Path, png: Path) -> bool:
    """Pretraining (train and held-out loss per language), SFT and QRPO losses in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {name: run / name / "metrics.jsonl" for name in ("pretrain", "sft", "align")}
    panels = [(name, list(read_jsonl(f)) if f.is_file() else []) for name, f in metrics.items()]
    panels = [(n, rows) for n, rows in panels if any("loss" in r for r in rows)]
    if not panels:
        return False
    titles = {"pretrain": "pretraining (AdEMAMix, WSD, Goldfish)", "sft": "SFT (assistant tokens)",
              "align": "QRPO"}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels, strict=True):
        x = "tokens" if name == "pretrain" else "step"
        train = [r for r in rows if "loss" in r]
        ax.plot([r[x] for r in train], [r["loss"] for r in train], lw=0.9, label="train")
        for k in sorted({k for r in rows for k in r if k.startswith("val/") and k.endswith("loss")}):
            pts = [(r[x], r[k]) for r in rows if k in r]
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, lw=0.8, label=k[4:-4].rstrip("/") or "held-out")
        if name == "pretrain":  # where the curriculum switches to code and math
            recipe = _read(run / "pretrain" / "recipe.json", {})
            for st in recipe.get("stages", [])[1:]:
                ax.axvline(st["start_tokens"], color="gray", ls=":", lw=1)
                ax.text(st["start_tokens"], ax.get_ylim()[1], f" {st['name']}", va="top", fontsize=7)
        ax.set(title=titles[name], xlabel=x, ylabel="loss" + (" (nats/token)" if name != "align" else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True


def _eval_tables(run: Path) -> list[str]:
    from .eval.report import markdown

    lines = []
    for sub, what in (("base", "base model (after pretraining): log-likelihood tasks"),
                      ("chat", "aligned model (after SFT and QRPO): GSM8K generated through the engine, 0-shot, "
                               "chat format")):
        res = _read(run / "eval" / sub / "results.json")
        if res:
            md = markdown(res).splitlines()
            lines += [f"### The {what}", ""] + [line.replace("## ", "#### ", 1) for line in md[2:]] + [""]
    summary = _read(run / "align" / "eval" / "summary.json")
    if summary:
        lines += ["### QRPO: held-out mean reward (rule-based: correct answer, GSM8K format, closeness of the "
                  "number)", "",
                  "| model | mean reward | ended its turn | mean tokens | samples |", "|---|---:|---:|---:|---:|"]
        for k in ("reference", "policy"):
            r = summary[k]
            lines.append(f"| {'SFT (reference)' if k == 'reference' else 'QRPO policy'} | {r['mean_reward']:.3f} | "
                         f"{100 * r['ended_turn']:.0f}% | {r['mean_tokens']:.0f} | {r['samples']} |")
        lines.append("")
    return lines or ["(no eval stage yet)"]


FINAL_ANSWER = re.compile(r"####\s*-?[\d,]*\.?\d+\s*$")


def _format_rate(rows: list[dict]) -> float:
    """Share of samples that end their turn and whose last line is a GSM8K final answer `#### N`."""
    return sum(r["finish_reason"] == "stop" and bool(FINAL_ANSWER.search(r["completion"].strip()))
               for r in rows) / max(len(rows), 1)


def _mean_stderr(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / max(len(xs), 1)
    var = sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)
    return m, math.sqrt(var / max(len(xs), 1))


def _verdict(met: bool) -> str:
    return "**met**" if met else "not met"


def _effects(run: Path) -> list[str]:
    """Each stage's effect beside the baseline a trivial model reaches, with its aim marked met or not."""
    rows = ["| stage | measure | this run | baseline | aim |", "|---|---|---:|---:|---|"]
    notes = []
    base = _read(run / "eval" / "base" / "results.json")
    unigram = _read(run / "eval" / "base" / "unigram.json")
    if base and unigram:
        langs = [lang for lang in unigram["bpb"] if f"flores_bpb_{lang}" in base["tasks"]]
        model = sum(base["tasks"][f"flores_bpb_{lang}"]["bpb"] for lang in langs) / len(langs)
        uni = sum(unigram["bpb"][lang] for lang in langs) / len(langs)
        below = 1 - model / uni
        rows.append(f"| pretraining | held-out FLORES bits per byte, mean of the {len(langs)} trained languages | "
                    f"{model:.3f} ({100 * below:+.1f}% vs unigram) | unigram {uni:.3f} | ≥ 15% below unigram: "
                    f"{_verdict(below >= 0.15)} |")
    if base and "langid" in base.get("groups", {}):
        g = base["groups"]["langid"]
        rows.append(f"| pretraining | language identification by likelihood, {g['subtasks']} languages "
                    f"({g['n']} sentences) | {100 * g['acc']:.1f}% | chance {100 * g['chance']:.0f}% | ≥ 80%: "
                    f"{_verdict(g['acc'] >= 0.8)} |")
    for group in ("xcopa", "piqa"):
        if base and group in base.get("groups", {}):
            g = base["groups"][group]
            rows.append(f"| pretraining | {group} multiple choice ({g['n']} questions) | {100 * g['acc']:.1f}% ± "
                        f"{100 * g['acc_stderr']:.1f} | chance {100 * g['chance']:.0f}% | none: not expected at "
                        f"this size |")
    ref, pol = (list(read_jsonl(run / "align" / "eval" / f"{k}.jsonl")) if (run / "align" / "eval" /
                f"{k}.jsonl").is_file() else [] for k in ("reference", "policy"))
    if ref:
        rate = _format_rate(ref)
        rows.append(f"| SFT | held-out GSM8K samples that end their turn with a final `#### N` line | "
                    f"{100 * rate:.0f}% of {len(ref)} | base model: no chat format | ≥ 90%: {_verdict(rate >= 0.9)} |")
    if ref and pol:
        (r, r_se), (q, q_se) = _mean_stderr([x["reward"] for x in ref]), _mean_stderr([x["reward"] for x in pol])
        spread = 2 * math.hypot(r_se, q_se)  # two standard errors of the difference
        moved = q - r > spread
        rows.append(f"| QRPO | held-out mean reward (the rule reward it optimises) | {q:.3f} ± {q_se:.3f} | "
                    f"SFT {r:.3f} ± {r_se:.3f} | above SFT by > 2 standard errors: {_verdict(moved)} |")
        if not moved:
            fell = r - q > spread
            rate = _format_rate(ref)
            why = (f": the SFT model already writes the reward's format term in {100 * rate:.0f}% of its samples and a "
                   "model of this size almost never finds the right number (its correctness term), so the pairs "
                   "differ mostly in how close a guessed number is") if rate >= 0.9 else ""
            what = (f"lowered its held-out reward by {r - q:.3f} over {len(pol)} samples" if fell else
                    f"moved its held-out reward by {q - r:+.3f} over {len(pol)} samples, within two standard errors "
                    f"of the difference ({spread:.3f})")
            notes.append(f"QRPO {what}{why}. This budget cannot show QRPO's effect; runs/posttrain_results.md is "
                         "the longer experiment, over two seeds.")
    state = _read(run / "speedrun.json")
    minutes = state and state.get("aim_minutes")  # the budget's aim, recorded by the run (none for --smoke)
    if len(rows) > 2 and minutes:
        total = total_seconds(state)
        rows.append(f"| all | time of every stage, on this machine (above) | {hms(total)} | — | ≤ {minutes} minutes on "
                    f"2 cores: {_verdict(total <= 60 * minutes)} |")
    if len(rows) == 2:
        return ["(no eval stage yet)"]
    return rows + ["", "Bits per byte of a unigram model: the run's tokenizer as a context-free distribution fitted "
                   "on the documents of the first pretraining stage (what counting tokens alone reaches; a "
                   "uniform distribution, the \"chance\" of the tables below, is far weaker). Language "
                   "identification: each FLORES test sentence is scored after a three-sentence prompt in each "
                   "candidate language; the most likely is the answer. QRPO's spread: standard errors over the "
                   "held-out samples. The longer post-training experiment with two seeds is in "
                   "runs/posttrain_results.md."] + [line for note in notes for line in ("", note)]


def _bpb_table(run: Path) -> list[str]:
    base, unigram = _read(run / "eval" / "base" / "results.json"), _read(run / "eval" / "base" / "unigram.json")
    if not base or not unigram:
        return []
    lines = ["", "| language | model | unigram | uniform |", "|---|---:|---:|---:|"]
    for lang, uni in unigram["bpb"].items():
        r = base["tasks"].get(f"flores_bpb_{lang}")
        if r:
            lines.append(f"| {lang} | {r['bpb']:.3f} | {uni:.3f} | {r['chance']:.3f} |")
    return lines


def _samples(run: Path) -> list[str]:
    """The pretraining samples (samples.jsonl) at the first, a middle and the last evaluation."""
    rows = list(read_jsonl(run / "pretrain" / "samples.jsonl")) if (run / "pretrain" / "samples.jsonl").is_file() \
        else []
    if not rows:
        return ["(no samples: the pretraining recipe has no [eval] prompts)"]
    by_step = {r["step"]: r for r in rows}  # a resumed run may have written a step twice: the last one counts
    steps = sorted(by_step)
    picked = sorted({steps[0], steps[len(steps) // 2], steps[-1]})
    lines = ["Continuations of the same prompts by the model during pretraining (temperature 0.8, top-p 0.9, "
             "the same seed every time):", "", "| prompt | " + " | ".join(f"step {s}" for s in picked) + " |",
             "|---|" + "---|" * len(picked)]
    for i, sample in enumerate(by_step[steps[0]]["samples"]):
        cells = [by_step[s]["samples"][i]["text"].replace("|", "\\|").replace("\n", " ⏎ ") for s in picked]
        lines.append(f"| {sample['prompt']} | " + " | ".join(cells) + " |")
    return lines


def _chats(run: Path) -> list[str]:
    rows = _read(run / "chat" / "chats.json")
    if not rows:
        return ["(no chat stage yet)"]
    lines = ["Greedy decoding (repetition penalty 1.3) through `apertus.infer.Engine` from the exported checkpoint "
             "(`export/hf`), in the Apertus chat format:", ""]
    for r in rows:
        for m in r["messages"]:
            lines.append(f"> **{m['role']}**: {m['content']}  ")
        reply = r["reply"].strip().replace("\n", "  \n> ")
        lines += [f"> **assistant** ({r['tokens']} tokens, {r['finish_reason']}): {reply}", ""]
    return lines


def _links(run: Path) -> list[str]:
    items = [("export/hf", "Hugging Face checkpoint (`transformers.AutoModelForCausalLM.from_pretrained`, vLLM, "
              "SGLang)"), ("export/apertus-speedrun.gguf", "GGUF for llama.cpp / Ollama"),
             ("cards/README.md", "model card"), ("cards/DATA_CARD.md", "data card"),
             ("cards/EU_PUBLIC_SUMMARY.md", "EU AI Act public summary of the training content"),
             ("data/dataset/manifest.json", "dataset manifest (recipe, versions, shard hashes, funnel)"),
             ("pretrain/run.json", "pretraining run manifest (config, seeds, artifact hashes)"),
             ("speedrun.json", "time and tokens per stage")]
    return [f"- [{path}]({path}): {what}" for path, what in items if (run / path).exists()]


def write_report(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    state = _read(run / "speedrun.json")
    if state is None:
        raise FileNotFoundError(f"{run}: no speedrun.json (not a speedrun directory)")
    mode = ("smoke test (--smoke: a few steps per stage)" if state["mode"]["smoke"] else
            f"{state['mode'].get('budget', 'demo')} budget")
    lines = [f"# Apertus speedrun — {mode}", "",
             "The whole Apertus pipeline on the embedded corpus: data → tokenizer → pretraining (multilingual, then "
             "code and math) → SFT → QRPO → evaluation → export → cards → chat. Regenerate with "
             f"`apertus report {run}`.", "", "## System", ""] + _system()
    lines += ["", "## Time and tokens per stage", ""] + _stage_table(state)
    manifest = _read(run / "data" / "dataset" / "manifest.json")
    if manifest:
        from .data.pipeline import funnel_table

        lines += ["", "## Data funnel", "", "Documents and tokens per source through each step of the pipeline "
                  "(`apertus data info data/dataset`):", "", "```", funnel_table(manifest), "```"]
    lines += ["", "## Tokenizer fertility by language", ""] + _fertility(run)
    lines += ["", "## Loss curves", ""]
    if plot_losses(run, run / "loss_curves.png"):
        lines += ["![loss curves](loss_curves.png)", "",
                  "Pretraining: training loss (Goldfish-masked) and held-out loss per language against tokens; the "
                  "dotted line is the switch to the code/math stage. SFT: loss on the assistant's tokens. QRPO: the "
                  "quantile-reward regression loss."]
    lines += ["", "## What each stage shows, against its baseline", ""] + _effects(run)
    lines += ["", "## Samples during pretraining", ""] + _samples(run)
    lines += ["", "## Bits per byte by language", ""]
    if (run / "eval" / "base" / "flores_bpb.png").is_file():
        lines += ["Held-out FLORES-200 test sentences; bits per byte do not depend on the tokenizer. The dashed "
                  "line is chance (a uniform distribution over the vocabulary).", "",
                  "![bits per byte](eval/base/flores_bpb.png)"] + _bpb_table(run)
    lines += ["", "## Evaluation (chance levels beside every score)", ""] + _eval_tables(run)
    lines += ["## Sample chats", ""] + _chats(run)
    lines += ["## Cards and exports", ""] + _links(run)
    out = run / "report.md"
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out
