"""Language identification: py3langid (its model ships inside the PyPI package, so it works offline) by default,
or any fastText LID model file by path (GlotLID, lid.176, or one trained with `fasttext`).

Labels are ISO 639-3 codes, optionally with a script (`deu_Latn`, as FLORES-200, GlotLID and FineWeb-2 write them).
`same_language` compares two labels at the macrolanguage level, since LID models and corpora disagree on whether
Arabic is `ara` or `arb`, Chinese `zho` or `cmn`, Persian `fas` or `pes`, and so on.
"""

from __future__ import annotations

import csv
import re
from functools import lru_cache
from pathlib import Path

# Individual languages -> the macrolanguage code the LID models use (ISO 639-3 macrolanguage tables).
MACRO = {
    **dict.fromkeys("arb acm acq aeb ajp apc ars ary arz abv afb ayl ayp".split(), "ara"),
    "cmn": "zho", "swh": "swa", "swc": "swa", "zsm": "msa",
    "ekk": "est", "lvs": "lav", "khk": "mon", "uzn": "uzb", "uzs": "uzb", "azj": "aze", "azb": "aze", "als": "sqi",
    "aln": "sqi", "npi": "nep", "gaz": "orm", "hae": "orm", "ory": "ori", "plt": "mlg", "ydd": "yid", "pbt": "pus",
    "pbu": "pus", "pes": "fas", "prs": "fas", "quy": "que", "quh": "que", "quz": "que", "kmr": "kur", "ckb": "kur",
    "sdh": "kur", "nob": "nor", "gug": "grn", "knc": "kau", "mvf": "mon",
}


def base_code(label: str) -> str:
    """`deu_Latn` -> `deu`; `__label__eng_Latn` -> `eng`; 2-letter codes -> ISO 639-3."""
    label = label.removeprefix("__label__")
    code = label.split("_")[0].split("-")[0].lower()
    return iso639_3(code)


def macro(label: str) -> str:
    code = base_code(label)
    return MACRO.get(code, code)


def same_language(a: str, b: str) -> bool:
    return macro(a) == macro(b)


@lru_cache(maxsize=1)
def _iso1_to_3() -> dict[str, str]:
    import datatrove

    table = {}
    csv_path = Path(datatrove.__file__).parent / "assets" / "tokenizer_assignment.csv"
    with open(csv_path, encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["code_1"] and (row["default_code_1"] == "TRUE" or row["code_1"] not in table):
                table[row["code_1"]] = row["code_3"]
    table.update(no="nob", tl="tgl", fa="pes", zh="zho", qu="quy", et="est", ku="kmr")  # FLORES-200 conventions
    return table


def iso639_3(code: str) -> str:
    return _iso1_to_3().get(code, code) if len(code) == 2 else code


class LangID:
    """`predict(text) -> (label, score)`; picklable, the model loads lazily in each worker."""

    def __init__(self, backend: str = "py3langid", model: str | None = None):
        if backend not in ("py3langid", "fasttext"):
            raise ValueError(f"langid backend must be 'py3langid' or 'fasttext', not {backend!r}")
        if backend == "fasttext" and not model:
            raise ValueError("langid backend 'fasttext' needs `model = \"path/to/model.bin\"` (e.g. GlotLID)")
        if model and not Path(model).is_file():
            raise FileNotFoundError(f"{model}: language-ID model file not found")
        self.backend, self.model_path, self._model = backend, model, None

    def __getstate__(self):
        return {**self.__dict__, "_model": None}

    @property
    def model(self):
        if self._model is None:
            if self.backend == "py3langid":
                from py3langid.langid import MODEL_FILE, LanguageIdentifier

                self._model = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
            else:
                import fasttext

                fasttext.FastText.eprint = lambda *a, **k: None  # silence its load warning
                self._model = fasttext.load_model(self.model_path)
        return self._model

    def predict(self, text: str) -> tuple[str, float]:
        text = " ".join(text.split())[:20000]  # fastText wants one line; the head of a document is enough
        if not text:
            return "und", 0.0
        if self.backend == "py3langid":
            code, score = self.model.classify(text)
            return iso639_3(code), float(score)
        labels, scores = self.model.predict(text, k=1)
        return labels[0].removeprefix("__label__"), float(min(1.0, scores[0]))


# A word tokenizer for every script, used by the datatrove quality filters and MinHash instead of their
# per-language spaCy/NLTK tokenizers (not installed, and unknown for most of our 400+ languages): words are runs of
# letters/digits/marks, punctuation runs are tokens (as spaCy makes them), and each Han/kana character is a word of
# its own (Thai, Lao, Khmer, Myanmar runs between spaces are phrases; Tibetan splits at the tsheg, a punctuation).
_SPACELESS = r"\p{Han}\p{Hiragana}\p{Katakana}"
_WORD = None


def words(text: str) -> list[str]:
    global _WORD
    if _WORD is None:
        import regex

        _WORD = regex.compile(rf"[{_SPACELESS}]|[^\s{_SPACELESS}\p{{P}}\p{{S}}]+|[\p{{P}}\p{{S}}]+")
    return _WORD.findall(text)


def _make_word_tokenizer():
    from datatrove.utils.word_tokenizers import WordTokenizer

    class UnicodeWordTokenizer(WordTokenizer):
        def __init__(self):
            super().__init__("xx")

        def word_tokenize(self, text: str) -> list[str]:
            return words(text)

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [m.span() for m in re.finditer(r"[^.!?。！？\n]+(?:[.!?。！？]+|\n|$)", text) if m.group().strip()]

        def sent_tokenize(self, text: str) -> list[str]:
            return [text[a:b].strip() for a, b in self.span_tokenize(text)]

        def __reduce__(self):
            return (word_tokenizer, ())

    return UnicodeWordTokenizer()


@lru_cache(maxsize=1)
def word_tokenizer():
    """The shared instance (hashable and picklable, as datatrove caches word splits per tokenizer)."""
    return _make_word_tokenizer()
