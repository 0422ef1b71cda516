"""Tokenizer fertility and cross-language fairness on parallel text (UDHR, FLORES), plus the corpus readers.

Fertility = tokens per whitespace word and tokens per UTF-8 byte, per language. On parallel text the token count
relative to English is the "tokenization premium" (Petrov et al. 2023): what a speaker pays per unit of meaning.
The fairness summary is the Gini coefficient of tokens-per-byte across languages (0 = every language equal).
"""

from __future__ import annotations

import json
import statistics
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from .config import data_root

_UDHR_NS = "{http://efele.net/udhr}"


def read_udhr(root=None, limit: int | None = None) -> dict[str, str]:
    """One complete (stage 4) UDHR text per language and script, as {"deu_Latn": text}; `limit` picks languages
    round-robin across scripts so a small sample still covers many writing systems."""
    root = Path(root) if root else data_root() / "udhr"
    if not root.is_dir():
        raise FileNotFoundError(f"UDHR corpus not found at {root} (it is embedded: unset APERTUS_DATA, or point it "
                                "at a folder holding udhr/)")
    stage = {e.get("f"): e.get("stage") for e in ET.parse(root / "index.xml").getroot()}
    texts = {}
    for file in sorted(root.glob("udhr_*.xml")):
        if stage.get(file.stem.removeprefix("udhr_")) != "4":
            continue
        doc = ET.parse(file).getroot()
        label = f"{doc.get('iso639-3')}_{doc.get('iso15924')}"
        if label in texts or label.startswith("und_"):
            continue
        parts = ("".join(e.itertext()).strip() for e in doc.iter() if e.tag in (_UDHR_NS + "title", _UDHR_NS + "para"))
        texts[label] = "\n".join(p for p in parts if p)
    if limit is None:
        return texts
    by_script: dict[str, list[str]] = {}
    for label in texts:
        by_script.setdefault(label.split("_")[-1], []).append(label)
    picked, queues = [], [list(v) for _, v in sorted(by_script.items())]
    while len(picked) < limit and any(queues):
        for q in queues:
            if q and len(picked) < limit:
                picked.append(q.pop(0))
    return {label: texts[label] for label in sorted(picked)}


# Languages whose fertility the speedrun report tabulates (scripts and resource levels across the range)
FERTILITY_LANGS = ("eng_Latn", "deu_Latn", "fra_Latn", "ita_Latn", "spa_Latn", "rus_Cyrl", "arb_Arab",
                   "hin_Deva", "zho_Hans", "jpn_Jpan", "swh_Latn", "yor_Latn", "tam_Taml")


def read_flores(root=None, splits: tuple[str, ...] = ("dev", "test")) -> dict[str, str]:
    """FLORES-200 sentences of `splits` (from SIB-200) per language, e.g. {"eng_Latn": text}; parallel across
    languages."""
    root = Path(root) if root else data_root() / "sib200" / "annotated"
    if not root.is_dir():
        raise FileNotFoundError(f"FLORES/SIB-200 corpus not found at {root} (it is embedded: unset APERTUS_DATA, or "
                                "point it at a folder holding sib200/)")
    texts = {}
    for lang in sorted(p for p in root.iterdir() if p.is_dir()):
        lines = []
        for split in splits:
            rows = (lang / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]
            lines += [r.split("\t", 2)[2] for r in rows if r.count("\t") >= 2]
        texts[lang.name] = "\n".join(lines)
    return texts


def iter_corpus(spec: str) -> Iterator[tuple[str, str]]:
    """(language label, text) pairs from `udhr`, `flores`, a .txt/.jsonl file or a directory of them. JSONL rows
    need "text" and may carry "language" (else the file name is the label)."""
    if spec in ("udhr", "flores", "sib200"):
        yield from (read_udhr() if spec == "udhr" else read_flores()).items()
        return
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise FileNotFoundError(f"no .txt or .jsonl files under {path}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"corpus {spec!r} is neither udhr, flores, nor a file or directory")
    for file in files:
        if file.suffix == ".jsonl":
            with open(file, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                            yield row.get("language") or row.get("lang") or file.stem, row["text"]
                        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                            raise ValueError(f"{file}:{n}: expected a JSON object with a 'text' field ({e})") from e
        else:
            yield file.stem, file.read_text(encoding="utf-8")


def gini(values: list[float]) -> float:
    """Gini coefficient: mean absolute difference over twice the mean (0 = all equal, towards 1 = one has all)."""
    xs = sorted(values)
    n, total = len(xs), sum(xs)
    if n == 0 or total == 0:
        return 0.0
    # sum_i sum_j |x_i - x_j| = 2 * sum_i (2i - n + 1) x_i for sorted x (i from 0)
    return sum((2 * i - n + 1) * x for i, x in enumerate(xs)) / (n * total)


def fertility(tokenizer, texts: dict[str, str]) -> dict[str, dict]:
    """Per language: tokens, words, bytes, tokens/word, tokens/byte (no BOS)."""
    labels = list(texts)
    counts = [len(ids) for ids in tokenizer.encode_batch([texts[k] for k in labels], bos=False)]
    rows = {}
    for label, n_tok in zip(labels, counts, strict=True):
        words, n_bytes = len(texts[label].split()), len(texts[label].encode("utf-8"))
        rows[label] = {"tokens": n_tok, "words": words, "bytes": n_bytes,
                       "tokens_per_word": n_tok / max(words, 1), "tokens_per_byte": n_tok / max(n_bytes, 1)}
    if "eng_Latn" in rows:  # premium on parallel text
        for r in rows.values():
            r["premium"] = r["tokens"] / max(rows["eng_Latn"]["tokens"], 1)
    return rows


def summarize(rows: dict[str, dict], vocab_size: int) -> dict:
    tpb = [r["tokens_per_byte"] for r in rows.values()]
    out = {"vocab_size": vocab_size, "languages": len(rows), "tokens": sum(r["tokens"] for r in rows.values()),
           # median: scripts written without spaces (zho, jpn, tha) have a handful of "words" per text
           "median_tokens_per_word": statistics.median(r["tokens_per_word"] for r in rows.values()),
           "mean_tokens_per_byte": statistics.fmean(tpb), "gini_tokens_per_byte": gini(tpb)}
    if all("premium" in r for r in rows.values()):
        prem = [r["premium"] for r in rows.values()]
        out |= {"median_premium": statistics.median(prem), "max_premium": max(prem), "gini_premium": gini(prem)}
    return out


def evaluate(tokenizers: dict[str, object], texts: dict[str, str], out_dir) -> dict:
    """Fertility of each named tokenizer on `texts`; writes fertility.json, fertility.md and fertility.png."""
    if not texts:
        raise ValueError("the corpus is empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    for name, tok in tokenizers.items():
        rows = fertility(tok, texts)
        result[name] = {"summary": summarize(rows, tok.vocab_size), "languages": rows}
    (out / "fertility.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (out / "fertility.md").write_text(markdown(result))
    plot(result, out / "fertility.png")
    return result


def markdown(result: dict) -> str:
    names = list(result)
    has_prem = all("median_premium" in result[n]["summary"] for n in names)
    lines = ["| tokenizer | vocab | languages | tokens | median tokens/word | mean tokens/byte | Gini(tokens/byte) |"
             + (" median premium vs eng | max premium |" if has_prem else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if has_prem else "")]
    for n in names:
        s = result[n]["summary"]
        lines.append(f"| {n} | {s['vocab_size']:,} | {s['languages']} | {s['tokens']:,} | "
                     f"{s['median_tokens_per_word']:.3f} | {s['mean_tokens_per_byte']:.4f} | "
                     f"{s['gini_tokens_per_byte']:.4f} |"
                     + (f" {s['median_premium']:.3f} | {s['max_premium']:.3f} |" if has_prem else ""))
    lines += ["", "Per language (tokens/word · tokens/byte):", "",
              "| language | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for lang in result[names[0]]["languages"]:
        cells = [f"{result[n]['languages'][lang]['tokens_per_word']:.2f} · "
                 f"{result[n]['languages'][lang]['tokens_per_byte']:.3f}" for n in names]
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_text(result: dict, out_dir) -> str:
    """The summary table of `markdown` and where the rest was written (`apertus tokenizer eval`)."""
    n = len(next(iter(result.values()))["languages"])
    return (markdown(result).split("\n\n")[0]
            + f"\n\n{n} languages; per-language table, JSON and chart in {out_dir}/fertility.{{md,json,png}}")


def plot(result: dict, file) -> None:
    """Grouped bars of tokens/byte: per language, or per script (median) when there are many languages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result)
    langs = list(result[names[0]]["languages"])
    by_script = len(langs) > 40 and all("_" in lang for lang in langs)
    if by_script:
        groups: dict[str, list[str]] = {}
        for lang in langs:
            groups.setdefault(lang.rsplit("_", 1)[1], []).append(lang)
        keys = sorted(groups, key=lambda g: -len(groups[g]))[:40]
        values = {n: [statistics.median(result[n]["languages"][lang]["tokens_per_byte"] for lang in groups[g])
                      for g in keys] for n in names}
        ticks = [f"{g} ({len(groups[g])})" for g in keys]
    else:
        keys = langs
        values = {n: [result[n]["languages"][k]["tokens_per_byte"] for k in keys] for n in names}
        ticks = keys
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.35 * len(keys) * len(names) + 2), 5))
    for i, n in enumerate(names):
        g = result[n]["summary"]["gini_tokens_per_byte"]
        ax.bar([k + i * width for k in range(len(keys))], values[n], width, label=f"{n} (Gini {g:.3f})")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], ticks, rotation=70, fontsize=7)
    ax.set_ylabel("tokens per UTF-8 byte (lower is better)")
    ax.set_title("Tokenizer fertility " + ("by script (median over languages; count)" if by_script else "by language"))
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)
