"""The evaluation data (the embedded corpora, data/) as multiple-choice documents and bits-per-byte corpora.

Prompts follow lm-evaluation-harness 0.4 (`tasks/xcopa`, `tasks/xwinograd`, `tasks/piqa`): the same context strings,
connectors and target delimiter, so our accuracies are comparable with the harness's. SIB-200 has no harness task;
it is asked as a prompt listing the seven topics, the topic name being the continuation (chance 1/7).

A document is an `MCDoc`: the (context, continuation) pairs to score, the gold index and the choice strings that
`acc_norm` (length in characters, the harness's) and `acc_bytes` (UTF-8 bytes) divide the log-likelihood by.
Every metric comes with its standard error (sample std / sqrt(n), as the harness computes it) and the chance level.
"""

from __future__ import annotations

import csv
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

from ..config import data_root
from ..util import read_jsonl


class MCDoc(NamedTuple):
    pairs: list[tuple[str, str]]  # one (context, continuation) per choice
    gold: int
    choices: list[str]  # what acc_norm / acc_bytes normalise by (the harness's doc_to_choice)


# --- multiple choice -------------------------------------------------------------------------------------------------

# lm-evaluation-harness tasks/xcopa/utils.py
XCOPA_CONNECTORS = {
    "et": ("sest", "seetõttu"), "ht": ("poukisa", "donk sa"), "id": ("karena", "maka"), "it": ("perché", "quindi"),
    "qu": ("imataq", "chaymi"), "sw": ("kwa sababu", "kwa hiyo"), "ta": ("காரணமாக", "எனவே"), "th": ("เพราะ", "ดังนั้น"),
    "tr": ("çünkü", "bu yüzden"), "vi": ("bởi vì", "vì vậy"), "zh": ("因为", "所以"),
}
XWINOGRAD_LANGS = ("en", "fr", "jp", "pt", "ru", "zh")
SIB200_PROMPT = ("Topic classification. Possible topics: {labels}.\n"
                 "Text: {text}\n"
                 "Topic:")


def corpus_root(root) -> Path:
    """`root` if given, else where the embedded corpora are read from."""
    return Path(root) if root is not None else data_root()


def xcopa_docs(lang: str, split: str = "test", root=None) -> list[MCDoc]:
    """premise minus its final period + connector, then each choice with a lower-cased first letter."""
    cause, effect = XCOPA_CONNECTORS[lang]
    docs = []
    for d in read_jsonl(corpus_root(root) / "xcopa" / lang / f"{split}.{lang}.jsonl"):
        ctx = d["premise"].strip()[:-1] + " " + (cause if d["question"] == "cause" else effect)
        choices = [c[0].lower() + c[1:] for c in (d["choice1"], d["choice2"])]
        docs.append(MCDoc([(ctx, " " + c) for c in choices], int(d["label"]), choices))
    return docs


# The dataset tokens are PTB-escaped in places; map them back to find each token in the raw sentence.
_PTB = {"``": '"', "''": '"', "-LRB-": "(", "-RRB-": ")"}


def xwinograd_docs(lang: str, root=None) -> list[MCDoc]:
    """The harness's "partial evaluation": the sentence up to the pronoun with each candidate in its place is the
    context, the rest of the sentence (the same for both) the continuation."""
    docs = []
    with open(corpus_root(root) / "xwinograd" / "dataset.tsv", encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row[0] != lang:
                continue
            sentence, tokens, pronoun, cands = row[3], json.loads(row[4]), json.loads(row[5]), json.loads(row[6])
            spans, p = [], 0
            for t in tokens:  # token index -> character span in the raw sentence
                k = sentence.find(_PTB.get(t, t), p)
                if k < 0:
                    raise ValueError(f"xwinograd: token {t!r} not found in {sentence!r}")
                spans.append((k, k + len(_PTB.get(t, t))))
                p = spans[-1][1]
            start, end = spans[pronoun[1][0]][0], spans[pronoun[1][1] - 1][1]
            contexts = [sentence[:start] + c[0] for c in cands]
            rest = " " + sentence[end:].strip()
            docs.append(MCDoc([(c, rest) for c in contexts], [c[3] for c in cands].index(True), contexts))
    return docs


def piqa_docs(root=None) -> list[MCDoc]:
    base = corpus_root(root) / "piqa"
    labels = (base / "valid-labels.lst").read_text().split()
    docs = []
    for d, label in zip(read_jsonl(base / "valid.jsonl"), labels, strict=True):
        ctx, choices = f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]]
        docs.append(MCDoc([(ctx, " " + c) for c in choices], int(label), choices))
    return docs


def sib200_langs(root=None) -> list[str]:
    return sorted(p.name for p in (corpus_root(root) / "sib200" / "annotated").iterdir() if p.is_dir())


def _sib200_rows(lang: str, split: str, root) -> list[dict]:
    path = corpus_root(root) / "sib200" / "annotated" / lang / f"{split}.tsv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    # the files are sorted by topic; FLORES order mixes topics, so a --limit prefix is not one topic
    return sorted(rows, key=lambda r: int(r["index_id"]))


def sib200_docs(lang: str, split: str = "test", root=None) -> list[MCDoc]:
    labels = (corpus_root(root) / "sib200" / "labels.txt").read_text(encoding="utf-8").split()
    docs = []
    for row in _sib200_rows(lang, split, root):
        ctx = SIB200_PROMPT.format(labels=", ".join(labels), text=row["text"].strip())
        docs.append(MCDoc([(ctx, " " + c) for c in labels], labels.index(row["category"]), labels))
    return docs


def mc_metrics(docs: list[MCDoc], lls: list[list[float]]) -> dict:
    """acc, acc_norm (by characters), acc_bytes, each with stderr, and the chance level."""
    hits = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for doc, ll in zip(docs, lls, strict=True):
        norm = {"acc": [1.0] * len(ll), "acc_norm": [max(len(c), 1) for c in doc.choices],
                "acc_bytes": [max(len(c.encode()), 1) for c in doc.choices]}
        for name, div in norm.items():
            scores = [x / d for x, d in zip(ll, div, strict=True)]
            hits[name].append(float(scores.index(max(scores)) == doc.gold))
    out = {"n": len(docs), "chance": mean([1 / len(d.pairs) for d in docs])}
    for name, h in hits.items():
        out[name], out[name + "_stderr"] = mean(h), mean_stderr(h)
    return out


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def mean_stderr(xs) -> float:
    """Sample standard deviation / sqrt(n): lm-eval's `mean_stderr`."""
    xs = list(xs)
    if len(xs) < 2:
        return float("nan")
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


# Language identification by likelihood: which of these languages is a FLORES test sentence in? The model scores the
# sentence after a short prompt in each candidate language (a few FLORES dev sentences) and picks the most likely.
# Ten languages with FLORES and UDHR text: German, French and Italian (the Swiss national languages FLORES has),
# English and six more European languages, nine of them in Latin script: chance is 10%, and close neighbours
# (Spanish/Portuguese, German/Dutch) have to be told apart by more than their alphabet.
LANGID_LANGS = ("deu_Latn", "fra_Latn", "ita_Latn", "eng_Latn", "spa_Latn", "por_Latn", "nld_Latn", "pol_Latn",
                "tur_Latn", "rus_Cyrl")
LANGID_PROMPT_SENTENCES = 3


def langid_docs(lang: str, candidates=LANGID_LANGS, root=None) -> list[MCDoc]:
    """One document per FLORES test sentence of `lang`: its choices are the sentence after the prompt of each
    candidate language; the gold choice is `lang`'s."""
    candidates = list(candidates)
    if lang not in candidates:
        raise ValueError(f"langid: {lang} is not among the candidate languages {candidates}")
    prompts = ["\n".join(flores_texts(c, "dev", root)[:LANGID_PROMPT_SENTENCES]) + "\n" for c in candidates]
    return [MCDoc([(p, text) for p in prompts], candidates.index(lang), list(candidates))
            for text in flores_texts(lang, "test", root)]


# --- bits-per-byte corpora -------------------------------------------------------------------------------------------


def flores_texts(lang: str, split: str = "test", root=None) -> list[str]:
    """The FLORES-200 sentences of SIB-200 (204 test / 99 dev per language, parallel across languages)."""
    return [row["text"].strip() for row in _sib200_rows(lang, split, root)]


_UDHR_NS = "{http://efele.net/udhr}"


def udhr_text(path: Path) -> tuple[str, str]:
    """(language key `iso639-3_Script`, plain text: the title/para texts in document order, one per line)."""
    root = ET.parse(path).getroot()
    code = root.get("iso639-3")
    if code == "und":  # several unrelated varieties share "und": keep them apart by file key
        code = f"und-{root.get('key')}"
    lang = f"{code}_{root.get('iso15924')}"
    lines = [" ".join("".join(el.itertext()).split()) for el in root.iter()
             if el.tag in (_UDHR_NS + "title", _UDHR_NS + "para")]
    return lang, "\n".join(line for line in lines if line)


def udhr_corpus(root=None, complete_only: bool = True) -> dict[str, list[str]]:
    """language -> texts of its UDHR translations (stage-4, i.e. complete, ones by default)."""
    base = corpus_root(root) / "udhr"
    complete = {e.get("f") for e in ET.parse(base / "index.xml").getroot().iter() if e.get("stage") == "4"}
    out: dict[str, list[str]] = {}
    for path in sorted(base.glob("udhr_*.xml")):
        if complete_only and path.stem.removeprefix("udhr_") not in complete:
            continue
        lang, text = udhr_text(path)
        if text:
            out.setdefault(lang, []).append(text)
    return out
