"""Pipeline steps of our own (datatrove PipelineSteps) and the funnel they record: for every source and language,
documents/tokens/bytes in, dropped or changed per step and reason, and out."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result
from datatrove.utils.batching import batched

from ..util import atomic_write_json
from .langid import LangID
from .pii import anonymize

FIELDS = ("docs", "tokens", "bytes", "items")


class Funnel:
    """Counts keyed by (source, language, event); events are `in`, `<step>:<reason>` and `out:<split>`.
    One instance is shared by the steps of a task; `SaveFunnel` writes it when the task's stream is exhausted."""

    def __init__(self):
        self.counts: dict[tuple[str, str, str], list[int]] = {}

    def add(self, source: str, language: str, event: str, docs=1, tokens=0, nbytes=0, items=0):
        row = self.counts.setdefault((source, language or "und", event), [0, 0, 0, 0])
        row[0] += docs
        row[1] += tokens
        row[2] += nbytes
        row[3] += items

    def doc(self, doc, event: str, items: int = 0):
        m = doc.metadata
        self.add(m.get("source", "?"), m.get("language"), event, 1, m.get("n_tokens", 0),
                 m.get("n_bytes", 0), items)

    def rows(self) -> list[list]:
        return [[*k, *v] for k, v in sorted(self.counts.items())]

    def merge_rows(self, rows):
        for s, lang, ev, *vals in rows:
            self.add(s, lang, ev, *vals)

    @classmethod
    def load_folder(cls, folder: Path) -> Funnel:
        f = cls()
        for p in sorted(Path(folder).glob("**/*.json")):
            f.merge_rows(json.loads(p.read_text()))
        return f

    def summary(self, by: str = "source") -> dict:
        """{key: {event: {docs, tokens, bytes, items}}} with key = source or language."""
        out: dict = {}
        for (source, lang, ev), vals in sorted(self.counts.items()):
            row = out.setdefault(source if by == "source" else lang, {}).setdefault(ev, dict.fromkeys(FIELDS, 0))
            for k, v in zip(FIELDS, vals, strict=True):
                row[k] += v
        return out


class SaveFunnel(PipelineStep):
    """Last step of a phase: passes documents through, then writes this task's funnel (atomically)."""

    name = "funnel"
    type = "📊 - STATS"

    def __init__(self, funnel: Funnel, folder: str):
        super().__init__()
        self.funnel, self.folder = funnel, folder

    def run(self, data, rank: int = 0, world_size: int = 1):
        self.funnel.counts.clear()  # runs before any upstream step pulls a document: a clean slate per task
        if data is not None:
            yield from data
        atomic_write_json(Path(self.folder) / f"{rank:05d}.json", self.funnel.rows())


class Ingest(PipelineStep):
    """First step after the readers: drops empty and oversized documents, identifies the language (kept in
    `lid_language`/`lid_score`; also `language` when the source declares none), counts tokens and bytes, and records
    every document as `in`."""

    name = "ingest"
    type = "🔢 - INGEST"

    def __init__(self, funnel: Funnel, tokenizer: str, lid: LangID | None = None, lid_skip_kinds=("code",),
                 min_chars: int = 1, max_chars: int = 1_000_000):
        super().__init__()
        self.funnel, self.tokenizer_path, self.lid = funnel, tokenizer, lid
        self.lid_skip_kinds, self.min_chars, self.max_chars = tuple(lid_skip_kinds), min_chars, max_chars
        self._tok = None

    def run(self, data, rank: int = 0, world_size: int = 1):
        from tokenizers import Tokenizer

        self._tok = self._tok or Tokenizer.from_file(self.tokenizer_path)
        for batch in batched(data, 256):
            keep = []
            for doc in batch:
                m = doc.metadata
                m["n_bytes"], m["n_tokens"] = len(doc.text.encode("utf-8", "surrogatepass")), 0
                if len(doc.text) > self.max_chars or len(doc.text.strip()) < self.min_chars:
                    self.funnel.doc(doc, "in")
                    self.funnel.doc(doc, "input:too_long" if len(doc.text) > self.max_chars else "input:empty")
                    continue
                if self.lid is not None and m.get("kind") not in self.lid_skip_kinds:
                    m["lid_language"], m["lid_score"] = self.lid.predict(doc.text)
                    m["language"] = m.get("language") or m["lid_language"]
                keep.append(doc)
            encodings = self._tok.encode_batch_fast([d.text for d in keep], add_special_tokens=False)
            for doc, enc in zip(keep, encodings, strict=True):
                doc.metadata["n_tokens"] = len(enc.ids) + 2  # + <s> and </s>
                self.funnel.doc(doc, "in")
                self.stat_update("documents")
                yield doc


class LanguageFilter(BaseFilter):
    """Drops by the annotation of `Ingest`: LID score below `min_score`, a language outside `languages`, or (when
    `drop_mismatch`) a declared language that LID contradicts."""

    name = "language"

    def __init__(self, min_score: float = 0.0, languages: list[str] | None = None, drop_mismatch: bool = False):
        super().__init__()
        self.min_score, self.drop_mismatch = min_score, drop_mismatch
        self.languages = {_macro(x) for x in languages} if languages else None

    def filter(self, doc):
        m = doc.metadata
        if "lid_language" not in m:
            return True
        if m["lid_score"] < self.min_score:
            return False, "low_score"
        if self.languages is not None and _macro(m["language"]) not in self.languages:
            return False, "excluded_language"
        if self.drop_mismatch and _macro(m["language"]) != _macro(m["lid_language"]):
            return False, "mismatch"
        return True


def _macro(label):
    from .langid import macro

    return macro(label)


class Tracked(PipelineStep):
    """Runs a filter (any datatrove BaseFilter, or an order-preserving step that only drops documents, like the
    datatrove dedup filters) on the documents of `kinds` and records each drop in the funnel as `<name>:<reason>`."""

    type = "🔻 - FILTER"

    def __init__(self, step: PipelineStep, name: str, funnel: Funnel, kinds=None, reason: str = "dropped"):
        super().__init__()
        self.step, self.name, self.funnel, self.reason = step, name, funnel, reason
        self.kinds = set(kinds) if kinds is not None else None

    def run(self, data, rank: int = 0, world_size: int = 1):
        if isinstance(self.step, BaseFilter):
            for doc in data:
                if self.kinds is None or doc.metadata.get("kind") in self.kinds:
                    ok, why = get_filter_result(self.step.filter(doc))
                    if not ok:
                        self.funnel.doc(doc, f"{self.name}:{why or self.reason}")
                        continue
                yield doc
            return
        seen = deque()

        def feed():
            for doc in data:
                seen.append(doc)
                yield doc

        for out in self.step.run(feed(), rank, world_size):
            while seen[0] is not out:
                self.funnel.doc(seen.popleft(), f"{self.name}:{self.reason}")
            seen.popleft()
            yield out
        while seen:
            self.funnel.doc(seen.popleft(), f"{self.name}:{self.reason}")


class PIIStep(PipelineStep):
    """Replaces PII (apertus.data.pii) in documents whose kind is not skipped (Apertus: not code or math)."""

    name = "pii"
    type = "✂️ - FORMAT"

    def __init__(self, funnel: Funnel, extended: bool = False, exact: bool = False, skip_kinds=("code", "math")):
        super().__init__()
        self.funnel, self.extended, self.exact, self.skip_kinds = funnel, extended, exact, tuple(skip_kinds)

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            if doc.metadata.get("kind") not in self.skip_kinds:
                text, counts = anonymize(doc.text, extended=self.extended, exact=self.exact)
                if text != doc.text:
                    doc.text = text
                    for kind, n in counts.items():
                        if n:
                            self.funnel.doc(doc, f"pii:{kind}", items=n)
            yield doc


QUALITY_FILTERS = {
    "gopher_quality": "GopherQualityFilter",
    "gopher_repetition": "GopherRepetitionFilter",
    "c4": "C4QualityFilter",
    "fineweb": "FineWebQualityFilter",
}


def quality_filter(name: str, options: dict) -> BaseFilter:
    """A datatrove quality filter by short name, with our script-agnostic word tokenizer unless `language` is set."""
    import datatrove.pipeline.filters as dt_filters

    from .langid import word_tokenizer

    if name not in QUALITY_FILTERS:
        raise ValueError(f"unknown quality filter {name!r}; choose from {', '.join(QUALITY_FILTERS)}")
    options = dict(options)
    options.setdefault("language", word_tokenizer())
    try:
        return getattr(dt_filters, QUALITY_FILTERS[name])(**options)
    except TypeError as e:
        raise ValueError(f"quality filter {name}: {e}") from None
