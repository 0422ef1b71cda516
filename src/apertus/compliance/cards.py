"""Model card, data card and the EU AI Act public summary of training content, generated from a run's manifests.

`write_cards(run_dir)` reads every run.json under RUN_DIR (the run itself and runs one or two folders down: data,
pretrain, sft, align), the manifest.json of each dataset they read, the checkpoint's config.json and any eval
`results.json`, and writes:
    README.md              Hugging Face model card (YAML front matter: license, language, datasets, model-index)
    DATA_CARD.md           sources with licences, the funnel per source and per language, tokens, curriculum
    EU_PUBLIC_SUMMARY.md   the sections of the AI Office's template for the public summary of training content
    card_trace.json        every number in the three files, with the manifest field (file#/json/pointer) it comes
                           from, so that it can be checked mechanically (`apertus verify` checks the files themselves)
Nothing is written by hand: a field the manifests do not hold is said to be "not recorded".
"""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import metadata
from pathlib import Path

from ..util import atomic_write_json, atomic_write_text
from .manifest import RUN_FILE

KIND_ORDER = ("align", "sft", "pretrain")  # the model a card describes: the last training stage present
NOT_RECORDED = "not recorded in the run manifests"


class Trace:
    """Formats numbers and remembers, for each, the JSON field it comes from."""

    def __init__(self, root: Path):
        self.root, self.entries, self._cache = root, [], {}

    def load(self, path: Path):
        path = Path(path)
        if path not in self._cache:
            self._cache[path] = json.loads(path.read_text())
        return self._cache[path]

    def get(self, path: Path, *keys):
        obj = self.load(path)
        for k in keys:
            obj = obj[k]
        return obj

    def num(self, path: Path, *keys, fmt: str = "{:,}") -> str:
        """The value at path#/keys, formatted, recorded in the trace."""
        value = self.get(path, *keys)
        text = NOT_RECORDED if value is None else fmt.format(value)
        pointer = "/" + "/".join(str(k).replace("~", "~0").replace("/", "~1") for k in keys)
        self.entries.append({"text": text, "value": value, "file": self._rel(path), "pointer": pointer})
        return text

    def derived(self, value, how: str, path: Path, fmt: str = "{:,}") -> str:
        text = fmt.format(value)
        self.entries.append({"text": text, "value": value, "file": self._rel(path), "derived": how})
        return text

    def _rel(self, path: Path) -> str:
        """The path as seen from the run folder (through symlinks, as the runs were found), else absolute."""
        for p, root in ((Path(path), self.root), (Path(path).resolve(), self.root.resolve())):
            try:
                return p.relative_to(root).as_posix()
            except ValueError:
                pass
        return str(Path(path).resolve())


def resolve_pointer(obj, pointer: str):
    for part in pointer.lstrip("/").split("/") if pointer != "/" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


# --- discovery ------------------------------------------------------------------------------------------------------

def find_runs(root: Path) -> list[Path]:
    found = [root / RUN_FILE] if (root / RUN_FILE).exists() else []
    found += sorted(root.glob(f"*/{RUN_FILE}")) + sorted(root.glob(f"*/*/{RUN_FILE}"))
    return [p.parent for p in found]


def _model_config(run: Path, art: dict) -> Path | None:
    """The newest model config among the artifacts: an exported Hugging Face folder, else the last checkpoint."""
    configs = [p for p in art if p.endswith("config.json") and not p.endswith(("generation_config.json",
                                                                                "tokenizer_config.json"))]
    hf = [p for p in configs if not p.startswith("checkpoints/")]
    pick = sorted(hf)[-1:] or sorted(configs)[-1:]
    return run / pick[0] if pick else None


def _license(source: dict) -> tuple[str, str]:
    """(licence, where it was read): the recipe's `license`, else the `**License...:**` line of the README.md
    next to (or above) the source's path, else the apertus package licence for the package's own code."""
    if source.get("license"):
        return source["license"], "data recipe"
    p = Path(source.get("path", ""))
    pkg = Path(__file__).resolve().parents[1]
    if p.resolve() == pkg:
        return metadata.metadata("apertus").get("License-Expression") or "Apache-2.0", "apertus package metadata"
    for folder in [p, *p.parents][:3]:
        readme = folder / "README.md"
        if readme.is_file():
            m = re.search(r"\*\*License[^*]*:\*\*\s*(.+)", readme.read_text(encoding="utf-8", errors="replace"))
            if m:
                return re.split(r" \(|\. ", m.group(1).strip())[0].rstrip("."), str(readme)
    return "unknown (not recorded)", "-"


def _iso639(lang: str) -> str | None:
    code = lang.split("_")[0]
    return code if re.fullmatch(r"[a-z]{2,3}", code) and code not in ("und", "zxx") else None


# --- data card ------------------------------------------------------------------------------------------------------

def data_card(t: Trace, dataset: Path) -> str:
    mp = dataset / "manifest.json"
    man = t.load(mp)
    recipe = man["recipe"]
    src_cfg = {s["name"]: s for s in recipe["sources"]}
    out = [f"# Data card: {man['name']}", "",
           f"Built by `apertus data build` from the recipe below; tokenizer `{Path(man['tokenizer']['path']).name}` "
           f"(sha256 `{man['tokenizer']['sha256'][:16]}...`, vocabulary {t.num(mp, 'tokenizer', 'vocab_size')}), "
           f"order seed {t.num(mp, 'seed')}, {t.num(mp, 'languages')} languages in the training split. "
           f"Every number below is a field of `manifest.json` (see `card_trace.json`).", "",
           "## Sources", "", "| source | kind | licence | train docs | train tokens | val docs | val tokens |",
           "|---|---|---|---:|---:|---:|---:|"]
    for name, s in man["sources"].items():
        lic, _ = _license(src_cfg.get(name, {}))
        out.append(f"| {name} | {s['kind']} | {lic} | {t.num(mp, 'sources', name, 'train', 'docs')} | "
                   f"{t.num(mp, 'sources', name, 'train', 'tokens')} | {t.num(mp, 'sources', name, 'val', 'docs')} | "
                   f"{t.num(mp, 'sources', name, 'val', 'tokens')} |")
    out += ["", "## Processing", "", "Steps in order (recipe `[steps.*]`; parameters as run):", ""]
    for step, cfg in recipe.get("steps", {}).items():
        out.append(f"- **{step}**: `{json.dumps(cfg, ensure_ascii=False)}`")
    out += ["", "## Filter funnel per source", "",
            "Documents and tokens entering, removed at each step (reason after the colon), PII placeholders inserted "
            "(`pii:*`, counted in replacements), and leaving per split. `optout_retro:*` rows are retrospective "
            "removals (`apertus optout apply`).", "",
            "| source | event | docs | tokens | replacements |", "|---|---|---:|---:|---:|"]
    funnel = man["funnel"]["by_source"]
    for src, events in funnel.items():
        for ev in sorted(events, key=lambda e: (e != "in", e.startswith("out"), e)):
            out.append(f"| {src} | {ev} | {t.num(mp, 'funnel', 'by_source', src, ev, 'docs')} | "
                       f"{t.num(mp, 'funnel', 'by_source', src, ev, 'tokens')} | "
                       f"{t.num(mp, 'funnel', 'by_source', src, ev, 'items')} |")
    by_lang = man["funnel"]["by_language"]
    events = sorted({e for ev in by_lang.values() for e in ev}, key=lambda e: (e != "in", e.startswith("out"), e))
    out += ["", "## Filter funnel per language", "", "Documents per event (PII events: replacements).", "",
            "| language | " + " | ".join(events) + " |", "|---|" + "---:|" * len(events)]
    for lang, ev in sorted(by_lang.items()):
        cells = [t.num(mp, "funnel", "by_language", lang, e, "items" if e.startswith("pii:") else "docs")
                 if e in ev else "0" for e in events]
        out.append(f"| {lang} | " + " | ".join(cells) + " |")
    out += ["", "## Curriculum", "", "| stage | token budget | sources (weights) | languages |", "|---|---:|---|---|"]
    for i, st in enumerate(man["stages"]):
        weights = ", ".join(f"{k} {t.num(mp, 'stages', i, 'sources', k, fmt='{:g}')}" for k in st["sources"])
        budget = t.num(mp, "stages", i, "tokens") if st.get("tokens") else "rest of the run"
        langs = ", ".join(st["languages"]) if st.get("languages") else "all"
        out.append(f"| {st['name']} | {budget} | {weights} | {langs} |")
    out += ["", "## Opt-out and removals", ""]
    if any(e.startswith("optout:") for evs in funnel.values() for e in evs):
        for src, evs in funnel.items():
            for e in evs:
                if e.startswith("optout:"):
                    docs = t.num(mp, "funnel", "by_source", src, e, "docs")
                    out.append(f"- build time, robots.txt ({e}): {src} lost {docs}"
                               f" documents ({t.num(mp, 'funnel', 'by_source', src, e, 'tokens')} tokens)")
    else:
        out.append("- build time: " + ("robots.txt opt-out configured, no document disallowed"
                                       if "optout" in recipe.get("steps", {}) else
                                       "no robots.txt snapshots configured in the recipe"))
    for i, rem in enumerate(man.get("optout", [])):
        out.append(f"- retrospective removal {rem['time']}: {t.num(mp, 'optout', i, 'docs')} documents, "
                   f"{t.num(mp, 'optout', i, 'tokens')} tokens (report `{rem['report']}`)")
    if not man.get("optout"):
        out.append("- retrospective removals: none so far (`apertus optout apply`)")
    if man.get("toxicity_thresholds"):
        out += ["", "## Toxicity thresholds (per language, top share dropped)", "", "| language | threshold |",
                "|---|---:|"]
        for lang in man["toxicity_thresholds"]:
            out.append(f"| {lang} | {t.num(mp, 'toxicity_thresholds', lang, fmt='{:.4g}')} |")
    if man.get("probes"):
        out += ["", "## Memorization probes", "",
                f"{t.num(mp, 'probes', 'n')} probe passages inserted into `{man['probes']['into']}` with exposures "
                + ", ".join(t.num(mp, "probes", "exposures", i) for i in range(len(man["probes"]["exposures"])))
                + " (0 = control, never shown)."]
    return "\n".join(out) + "\n"


# --- EU AI Act public summary ---------------------------------------------------------------------------------------

def _size_bucket(tokens: int) -> str:
    return ("less than 1 billion tokens" if tokens < 1e9 else "1 billion to 10 trillion tokens" if tokens <= 1e13
            else "more than 10 trillion tokens")


def _eu_general(t: Trace, model_name: str, provider: str, datasets: list[Path], model_run: Path | None) -> list[str]:
    out = ["## 1. General information", "", "### 1.1 Provider", "", f"- Provider: {provider}", "",
           "### 1.2 Model", "", f"- Model: {model_name}"]
    if model_run is not None:
        rp = model_run / RUN_FILE
        run = t.load(rp)
        out += [f"- Run recorded: {run['created']}", f"- Tokens seen in training: {t.num(rp, 'tokens')}"]
        for p in run.get("parents", []):
            out.append(f"- Built on: `{p['path']}`")
    out += ["", "### 1.3 Modalities, size and characteristics", "", "- Modality: text (natural language, code, math)"]
    for d in datasets:
        mp = d / "manifest.json"
        man = t.load(mp)
        total = sum(s["n_tokens"] for s in man["shards"])
        out += [f"- Dataset `{man['name']}`: {t.derived(total, 'sum of shards[*].n_tokens', mp)} tokens "
                f"({_size_bucket(total)}); {t.num(mp, 'languages')} languages in the training split",
                "- Languages: " + ", ".join(sorted(man["funnel"]["by_language"])[:400])]
    return out


def _eu_crawled(t: Trace, datasets: list[Path]) -> list[str]:
    from ..data.optout import host_of
    from ..data.shards import read_index

    out = []
    for d in datasets:
        urls = [u for u in read_index(d, columns=["url"])["url"].to_pylist() if u]
        if urls:
            hosts = Counter(host_of(u) for u in urls)
            top = [h for h, _ in hosts.most_common(max(1, len(hosts) // 10))]
            n = t.derived(len(hosts), "distinct URL hosts in documents.parquet", d / "documents.parquet")
            out.append(f"- `{d.name}`: {n}"
                       f" domains; top 10% by documents: {', '.join(top)}")
        else:
            out.append(f"- `{d.name}`: no document carries a URL")
    return out


def _eu_sources(t: Trace, datasets: list[Path]) -> list[str]:
    out = ["## 2. List of data sources", "", "### 2.1 Publicly available datasets", ""]
    for d in datasets:
        mp = d / "manifest.json"
        man = t.load(mp)
        for s in man["recipe"]["sources"]:
            lic, _ = _license(s)
            if s["name"] in man["sources"]:
                out.append(f"- `{s['name']}` ({s.get('kind', 'web')}, reader `{s['reader']}`, licence {lic}): "
                           f"{t.num(mp, 'sources', s['name'], 'train', 'tokens')} training tokens")
    out += ["", "### 2.2 Private datasets obtained from third parties", "", "- None used.", "",
            "### 2.3 Data crawled and scraped from online sources", "",
            "- The provider ran no crawler. Web text comes from the public datasets of 2.1 with the URLs they carry."]
    out += _eu_crawled(t, datasets)
    synthetic = [s["name"] for d in datasets for s in t.load(d / "manifest.json")["recipe"]["sources"]
                 if s.get("kind") == "synthetic"]
    out += ["", "### 2.4 User data", "", "- None.", "", "### 2.5 Synthetic data", "",
            "- " + ("Sources of kind `synthetic`: " + ", ".join(synthetic) if synthetic else "None."),
            "", "### 2.6 Other sources", "", "- Memorization probes (see the data card), if any."]
    return out


def _eu_optout(t: Trace, datasets: list[Path]) -> list[str]:
    out = ["### 3.1 Respect of reservations of rights (text and data mining opt-out)", ""]
    for d in datasets:
        mp = d / "manifest.json"
        man = t.load(mp)
        if "optout" in man["recipe"].get("steps", {}):
            out.append(f"- `{man['name']}`: robots.txt snapshots honoured retroactively for the AI crawler agents "
                       "of the Apertus pipeline (and `*`); absent robots.txt = kept.")
            for src, evs in man["funnel"]["by_source"].items():
                for e in evs:
                    if e.startswith("optout:"):
                        out.append(f"  - {src}: {t.num(mp, 'funnel', 'by_source', src, e, 'docs')} documents removed")
        else:
            out.append(f"- `{man['name']}`: no robots.txt snapshots configured at build time.")
        for i, rem in enumerate(man.get("optout", [])):
            out.append(f"  - retrospective removal {rem['time']}: {t.num(mp, 'optout', i, 'docs')} documents "
                       f"(report `{rem['report']}`)")
        out.append("- Removal requests: `apertus optout apply` (URLs, domains, text hashes) rebuilds the affected "
                   "shards; `apertus optout check` answers whether a URL or text was used and in which stage.")
    return out


def _eu_processing(t: Trace, datasets: list[Path]) -> list[str]:
    out = ["## 3. Data processing", "", *_eu_optout(t, datasets), "", "### 3.2 Removal of illegal and harmful content",
           ""]
    for d in datasets:
        mp = d / "manifest.json"
        for src, evs in t.load(mp)["funnel"]["by_source"].items():
            for e in sorted(evs):
                if e.startswith(("pii:", "toxicity")):
                    what = "placeholders" if e.startswith("pii:") else "documents removed"
                    key = "items" if e.startswith("pii:") else "docs"
                    out.append(f"- {src}, {e}: {t.num(mp, 'funnel', 'by_source', src, e, key)} {what}")
    out += ["", "### 3.3 Other information", "",
            "- A PII output filter (e-mails, IBANs, card numbers, IPs, phones, hashed removal requests) is available "
            "for generation (`apertus redact`, the engine's filter option)."]
    return out


def eu_summary(t: Trace, model_name: str, provider: str, datasets: list[Path], model_run: Path | None) -> str:
    out = [f"# Public summary of training content: {model_name}", "",
           "Following the sections of the EU AI Office template for the public summary of the content used to train "
           "a general-purpose AI model (Art. 53(1)(d) AI Act). Generated from the run manifests.", "",
           *_eu_general(t, model_name, provider, datasets, model_run), "", *_eu_sources(t, datasets), "",
           *_eu_processing(t, datasets)]
    return "\n".join(out) + "\n"


# --- model card -----------------------------------------------------------------------------------------------------

def _front_matter(fields: dict) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(fields, sort_keys=False, allow_unicode=True) + "---\n"


def _eval_results(root: Path) -> list[Path]:
    found = []
    for p in sorted(root.glob("**/results.json")):
        if len(p.relative_to(root).parts) <= 4:
            try:
                if "tasks" in json.loads(p.read_text()):
                    found.append(p)
            except ValueError:
                pass
    return found


def _model_section(t: Trace, model_run: Path, fm: dict) -> list[str]:
    """The architecture table from the model's config.json; records the base model in the front matter."""
    rp = model_run / RUN_FILE
    run = t.load(rp)
    body = []
    cfg_path = _model_config(model_run, run["artifacts"])
    if cfg_path is not None and cfg_path.is_file():
        body += ["## Model", "", "| | |", "|---|---:|"]
        if "parameters" in run.get("metrics", {}):
            body.append(f"| parameters | {t.num(rp, 'metrics', 'parameters')} |")
        for key, label in (("num_hidden_layers", "layers"), ("hidden_size", "hidden size"),
                           ("num_attention_heads", "attention heads"), ("num_key_value_heads", "key-value heads"),
                           ("intermediate_size", "MLP size (xIELU)"), ("vocab_size", "vocabulary"),
                           ("max_position_embeddings", "context length"), ("rope_theta", "RoPE theta")):
            if key in t.load(cfg_path):
                fmt = "{:,.0f}" if key == "rope_theta" else "{:,}"
                body.append(f"| {label} | {t.num(cfg_path, key, fmt=fmt)} |")
        body.append("")
    base = next((p["path"] for p in run.get("parents", [])), None)
    if base:
        fm["base_model"] = Path(base).name
    return body


def _training_section(t: Trace, runs: list[Path], model_run: Path | None) -> list[str]:
    body = ["## Training", "", "| run | kind | tokens | FLOPs | wall time (s) | energy, ESTIMATE (kWh) |",
            "|---|---|---:|---:|---:|---:|"]
    for r in runs:
        rp = r / RUN_FILE
        run = t.load(rp)
        energy = t.num(rp, "energy", "kwh", fmt="{:.3g}") if run.get("energy") else NOT_RECORDED
        body.append(f"| `{t._rel(r) or '.'}` | {run['kind']} | {t.num(rp, 'tokens')} | "
                    f"{t.num(rp, 'flops', fmt='{:.3g}')} | {t.num(rp, 'wall_time_s', fmt='{:,.1f}')} | {energy} |")
    body.append("")
    body.append("Energy is an estimate (device power x devices x wall time, nothing measured); the assumed power is in "
                "each run.json under `energy`.")
    if model_run is not None:
        rp = model_run / RUN_FILE
        run = t.load(rp)
        hw, code = run["hardware"], run["code"]
        body += ["", f"- Hardware: {hw.get('cpu')} ({hw.get('cpu_count')} CPUs)"
                 + (f", {', '.join(hw['accelerators'])}" if hw.get("accelerators") else ""),
                 f"- Code: apertus {code.get('apertus')}, commit {code.get('git_commit') or NOT_RECORDED}"
                 + (" (uncommitted changes)" if code.get("git_dirty") else ""),
                 f"- Seeds: `{json.dumps(run['seeds'])}`"]
        train = run["config"].get("train", {}) if isinstance(run["config"], dict) else {}
        if train.get("goldfish_k"):
            body.append(f"- Goldfish loss: k = {t.num(rp, 'config', 'train', 'goldfish_k')}, "
                        f"h = {t.num(rp, 'config', 'train', 'goldfish_h')} (a token in every k is not trained on)")
    return body


def _eval_section(t: Trace, model_name: str, evals: list[Path], fm: dict) -> list[str]:
    """One table per results.json; the same figures go into the front matter's model-index."""
    body, index = ["", "## Evaluation", ""], []
    for ep in evals:
        res = t.load(ep)
        body += [f"From `{t._rel(ep)}`:", "", "| task | metric | value | ± stderr | n |",
                 "|---|---|---:|---:|---:|"]
        metrics = []
        for task, r in res["tasks"].items():
            for m in ("acc", "acc_norm", "exact_match", "bpb"):
                if m in r and r[m] is not None:
                    err = t.num(ep, "tasks", task, m + "_stderr", fmt="{:.4f}") if r.get(m + "_stderr") \
                        is not None else "–"
                    body.append(f"| {task} | {m} | {t.num(ep, 'tasks', task, m, fmt='{:.4f}')} | {err} | "
                                f"{t.num(ep, 'tasks', task, 'n')} |")
                    metrics.append({"type": m, "value": r[m], "name": f"{task} {m}"})
                    break
        body.append("")
        index.append({"task": {"type": "text-generation"}, "dataset": {"name": ep.parent.name,
                                                                        "type": ep.parent.name},
                      "metrics": metrics})
    fm["model-index"] = [{"name": model_name, "results": index}]
    return body


COMPLIANCE_SECTION = [
    "", "## Compliance", "",
    "- Training data: robots.txt opt-out honoured retroactively (docs/recipe.md §5), PII replaced by placeholders "
    "(e-mail, IP, IBAN), toxic documents filtered per language, deduplication; details and counts in "
    "`DATA_CARD.md`.",
    "- Removal requests: `apertus optout apply` removes documents from the built data; `apertus optout check` "
    "tells whether a URL or a text was used.",
    "- Outputs: a PII output filter is available (`apertus redact`, and the engine's filter option).",
    "- Integrity: `apertus verify RUN_DIR` re-hashes every shard and checkpoint listed in the run manifests."]

LIMITATIONS_SECTION = [
    "", "## Limitations", "",
    "- Numbers describe this run only. The energy figure is an estimate, not a measurement.",
    "- The output filter is pattern based: it does not recognise names or addresses unless they are in the "
    "hashed removal list."]


def _artifact_hashes(t: Trace, runs: list[Path]) -> list[str]:
    body = ["", "## Reproducibility", "", "| artifact | sha256 |", "|---|---|"]
    for r in runs:
        run = t.load(r / RUN_FILE)
        for rel, rec in list(run["artifacts"].items())[:40]:
            if rel.endswith((".safetensors", ".distcp", ".bin", "manifest.json", "config.json")):
                body.append(f"| `{(t._rel(r) + '/' if t._rel(r) not in ('', '.') else '') + rel}` | "
                            f"`{rec['sha256']}` |")
    return body


def model_card(t: Trace, model_name: str, runs: list[Path], model_run: Path | None, datasets: list[Path],
               evals: list[Path], license_: str) -> str:
    langs = sorted({c for d in datasets for lang in t.load(d / "manifest.json")["funnel"]["by_language"]
                    if (c := _iso639(lang))})
    fm = {"license": license_.lower(), "language": langs, "library_name": "transformers",
          "pipeline_tag": "text-generation", "tags": ["apertus", "compliance-artifacts"],
          "datasets": [t.load(d / "manifest.json")["name"] for d in datasets]}
    body = [f"# {model_name}", "",
            "An Apertus-architecture decoder-only language model trained with the `apertus` pipeline. This card, the "
            "data card (`DATA_CARD.md`) and the public summary (`EU_PUBLIC_SUMMARY.md`) are generated from the run "
            "manifests; `card_trace.json` gives the manifest field of every number.", ""]
    if model_run is not None:
        body += _model_section(t, model_run, fm)
    body += _training_section(t, runs, model_run)
    body += ["", "## Training data", "", "See `DATA_CARD.md` for sources, licences, the filter funnel and the "
             "curriculum; `EU_PUBLIC_SUMMARY.md` for the AI Act summary.", "",
             "| dataset | source | training tokens |", "|---|---|---:|"]
    for d in datasets:
        mp = d / "manifest.json"
        man = t.load(mp)
        for s in man["sources"]:
            body.append(f"| {man['name']} | {s} | {t.num(mp, 'sources', s, 'train', 'tokens')} |")
    if evals:
        body += _eval_section(t, model_name, evals, fm)
    body += COMPLIANCE_SECTION + _artifact_hashes(t, runs) + LIMITATIONS_SECTION
    return _front_matter(fm) + "\n" + "\n".join(body) + "\n"


# --- entry point ----------------------------------------------------------------------------------------------------

def write_cards(run_dir: str | Path, out: str | Path | None = None, model_name: str | None = None,
                provider: str | None = None, license_: str = "Apache-2.0") -> dict[str, Path]:
    root = Path(run_dir)
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"{root}: no run.json here or one or two folders down; record runs with "
                                "`apertus manifest DIR` (data builds and training runs write it)")
    t = Trace(root)
    kinds = {r: t.load(r / RUN_FILE)["kind"] for r in runs}
    model_run = next((r for k in KIND_ORDER for r in runs if kinds[r] == k), None)
    datasets, seen = [], set()
    for r in runs:
        cands = [r] if kinds[r] == "data" else [Path(ds["path"]) for ds in t.load(r / RUN_FILE).get("datasets", [])]
        for d in cands:
            if (d / "manifest.json").is_file() and d.resolve() not in seen:
                seen.add(d.resolve())
                datasets.append(d)
    name = model_name or (root.resolve().name if model_run is None else f"apertus-{root.resolve().name}")
    out = Path(out) if out else root / "card"
    out.mkdir(parents=True, exist_ok=True)
    files = {"README.md": model_card(t, name, runs, model_run, datasets, _eval_results(root), license_),
             "DATA_CARD.md": "\n".join(data_card(t, d) for d in datasets) or "# Data card\n\nNo dataset recorded.\n",
             "EU_PUBLIC_SUMMARY.md": eu_summary(t, name, provider or NOT_RECORDED, datasets, model_run)}
    written = {}
    for fname, text in files.items():
        written[fname] = atomic_write_text(out / fname, text)
    atomic_write_json(out / "card_trace.json", {"root": str(root.resolve()), "entries": t.entries})
    written["card_trace.json"] = out / "card_trace.json"
    return written
