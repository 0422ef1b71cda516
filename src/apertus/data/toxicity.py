"""Toxicity: score documents with a pluggable classifier, then drop the top `drop_top` (Apertus: 5%) per language.

Scorers: `lexicon` (default; the multilingual word lists of the MIT-licensed `glin-profanity` package, 24 languages
incl. all 9 of Apertus's toxicity languages; score = matched words / words), a fastText classifier file (`.bin`/
`.ftz`, probability of `__label__toxic`), or a Hugging Face sequence-classification model directory (e.g. an export
of swiss-ai's XLM-R toxicity classifier; probability of class `label`, max over 512-token chunks as Apertus did).
Scores are written per task in the filter phase; the percentile thresholds are computed over all of them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from ..util import atomic_write_json
from .langid import macro, words

# docs/recipe.md §5: the languages Apertus scored for toxicity.
APERTUS_LANGUAGES = ("eng", "zho", "fra", "deu", "ita", "nld", "pol", "spa", "por")
GLIN_FILES = {"ara": "arabic", "zho": "chinese", "ces": "czech", "dan": "danish", "nld": "dutch", "eng": "english",
              "epo": "esperanto", "fin": "finnish", "fra": "french", "deu": "german", "hin": "hindi",
              "hun": "hungarian", "ita": "italian", "jpn": "japanese", "kor": "korean", "nor": "norwegian",
              "fas": "persian", "pol": "polish", "por": "portuguese", "rus": "russian", "spa": "spanish",
              "tur": "turkish", "swe": "swedish", "tha": "thai"}
SPACELESS = {"zho", "jpn", "tha"}


@lru_cache(maxsize=64)
def _lexicon(lang: str):
    import glin_profanity
    import regex

    path = Path(glin_profanity.__file__).parent / "data" / "dictionaries" / f"{GLIN_FILES[lang]}.json"
    terms = sorted({w.lower() for w in json.loads(path.read_text(encoding="utf-8"))["words"] if w.strip()},
                   key=len, reverse=True)
    body = "|".join(regex.escape(t) for t in terms)
    return regex.compile(f"(?:{body})" if lang in SPACELESS else rf"(?<!\w)(?:{body})(?!\w)")


class LexiconScorer:
    def languages(self):
        return set(GLIN_FILES)

    def score(self, texts: list[str], langs: list[str]) -> list[float]:
        out = []
        for text, lang in zip(texts, langs, strict=True):
            n = max(1, len(words(text)))
            out.append(min(1.0, len(_lexicon(lang).findall(text.lower())) / n))
        return out


class FastTextScorer:
    def __init__(self, path: str, label: str = "toxic"):
        self.path, self.label, self._m = path, f"__label__{label}", None

    def __getstate__(self):
        return {**self.__dict__, "_m": None}

    def languages(self):
        return None  # any

    def score(self, texts, langs):
        if self._m is None:
            import fasttext

            fasttext.FastText.eprint = lambda *a, **k: None
            self._m = fasttext.load_model(self.path)
        labels, probs = self._m.predict([" ".join(t.split()) for t in texts], k=-1)
        return [float(dict(zip(lab, p, strict=True)).get(self.label, 0.0))
                for lab, p in zip(labels, probs, strict=True)]


class HFScorer:
    def __init__(self, path: str, label: int = 1, max_length: int = 512, max_chunks: int = 8):
        self.path, self.label, self.max_length, self.max_chunks, self._m = path, label, max_length, max_chunks, None

    def __getstate__(self):
        return {**self.__dict__, "_m": None}

    def languages(self):
        return None

    def score(self, texts, langs):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if self._m is None:
            self._m = (AutoTokenizer.from_pretrained(self.path),
                       AutoModelForSequenceClassification.from_pretrained(self.path).eval())
        tok, model = self._m
        out = []
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            n = self.max_length - 2
            chunks = [ids[i:i + n] for i in range(0, max(1, len(ids)), n)][: self.max_chunks]
            batch = tok.pad({"input_ids": [tok.build_inputs_with_special_tokens(c) for c in chunks]},
                            return_tensors="pt")
            with torch.no_grad():
                probs = model(**batch).logits.float().softmax(-1)[:, self.label]
            out.append(float(probs.max()))  # a document is as toxic as its worst chunk (Apertus)
        return out


def make_scorer(model: str = "lexicon", label=None):
    if model == "lexicon":
        return LexiconScorer()
    p = Path(model)
    if p.is_dir():
        return HFScorer(model, label=1 if label is None else int(label))
    if p.is_file():
        return FastTextScorer(model, label="toxic" if label is None else str(label))
    raise FileNotFoundError(f"toxicity model {model}: not 'lexicon', a model directory or a fastText file")


class ToxicityScore(PipelineStep):
    """Annotates `metadata["toxicity"]` for documents in scored languages (not code/math) and writes this task's
    scores per language to `folder/<rank>.json`."""

    name = "toxicity score"
    type = "☣️ - SCORE"

    def __init__(self, folder: str, model: str = "lexicon", label=None, languages=APERTUS_LANGUAGES,
                 skip_kinds=("code", "math"), batch_size: int = 32):
        super().__init__()
        self.folder, self.scorer = folder, make_scorer(model, label)
        own = self.scorer.languages()
        wanted = {macro(x) for x in languages} if languages else None
        self.languages = (wanted & own if wanted and own else wanted or own)
        self.skip_kinds, self.batch_size = tuple(skip_kinds), batch_size

    def run(self, data, rank: int = 0, world_size: int = 1):
        from datatrove.utils.batching import batched

        scores: dict[str, list[float]] = {}
        for batch in batched(data, self.batch_size):
            todo = [(d, macro(d.metadata.get("language") or "und")) for d in batch
                    if d.metadata.get("kind") not in self.skip_kinds]
            todo = [(d, lang) for d, lang in todo if self.languages is None or lang in self.languages]
            if todo:
                got = self.scorer.score([d.text for d, _ in todo], [x for _, x in todo])
                for (d, lang), s in zip(todo, got, strict=True):
                    d.metadata["toxicity"] = s
                    scores.setdefault(lang, []).append(s)
            yield from batch
        atomic_write_json(Path(self.folder) / f"{rank:05d}.json", scores)


def thresholds(folder: str | Path, drop_top: float = 0.05, min_docs: int = 20) -> dict[str, float]:
    """Per-language score above which a document is in the top `drop_top` (languages with fewer than `min_docs`
    scored documents get no cut: a percentile of a handful of documents means nothing)."""
    scores: dict[str, list[float]] = {}
    for p in sorted(Path(folder).glob("*.json")):
        for lang, s in json.loads(p.read_text()).items():
            scores.setdefault(lang, []).extend(s)
    return {lang: float(np.quantile(np.asarray(s), 1.0 - drop_top)) for lang, s in sorted(scores.items())
            if len(s) >= min_docs}


class ToxicityCut(BaseFilter):
    """Drops documents scored above their language's threshold (computed once per task from all scores)."""

    name = "toxicity"

    def __init__(self, folder: str, drop_top: float = 0.05, min_docs: int = 20):
        super().__init__()
        self.folder, self.drop_top, self.min_docs, self._thr = folder, drop_top, min_docs, None

    def filter(self, doc):
        if self._thr is None:
            self._thr = thresholds(self.folder, self.drop_top, self.min_docs)
        s = doc.metadata.get("toxicity")
        if s is None:
            return True
        thr = self._thr.get(macro(doc.metadata.get("language") or "und"))
        return True if thr is None or s <= thr else (False, "top_percentile")

