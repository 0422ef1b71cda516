"""Readers (datatrove BaseDiskReaders, so files are sharded across tasks and paths may be any fsspec URL):
JSONL, Parquet, plain-text folders, and the embedded corpora UDHR (XML) and SIB-200/FLORES (TSV).

Every document carries `source`, `kind` (web, code, math) and, where the source knows it, `language` and `url`.
Bad input is never fatal: a malformed JSON line, invalid UTF-8, a missing field or an unreadable file is counted in
the funnel as `input:<reason>` and skipped.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.readers.base import BaseDiskReader

from .steps import Funnel

KINDS = ("web", "code", "math")


class SourceReader(BaseDiskReader):
    """Shared logic: `path` is a folder (with an optional `glob`) or one file."""

    name = "source"

    def __init__(self, source: str, path: str, funnel: Funnel, kind: str = "web", language: str | None = None,
                 glob: str | None = None, limit: int = -1, text: str = "text", template: str | None = None,
                 id_key: str = "id", url_key: str = "url", language_key: str = "language"):
        if kind not in KINDS:
            raise ValueError(f"source {source}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
        p = Path(path)
        if "://" not in path and not p.exists():
            raise FileNotFoundError(f"source {source}: {path} not found")
        if p.is_file():
            path, glob = str(p.parent), p.name
        super().__init__(path, limit=limit, glob_pattern=glob, add_file_path=False)
        self.source, self.funnel, self.kind, self.language = source, funnel, kind, language
        self.text_key, self.template, self.id_key = text, template, id_key
        self.url_key, self.language_key = url_key, language_key

    def bad(self, reason: str, nbytes: int = 0, n: int = 1):
        self.funnel.add(self.source, "und", f"input:{reason}", docs=n, nbytes=nbytes)

    def make(self, text: str, doc_id: str, **meta) -> Document:
        meta = {k: v for k, v in meta.items() if v is not None}
        meta.setdefault("language", self.language)
        return Document(text=text, id=f"{self.source}/{doc_id}",
                        metadata={"source": self.source, "kind": self.kind, **meta})

    def from_record(self, row: dict, doc_id: str) -> Document | None:
        """A document from a JSON/Parquet record, or None (counted) when the text field is missing."""
        try:
            text = self.template.format_map(row) if self.template else row[self.text_key]
        except (KeyError, IndexError, AttributeError, ValueError):
            text = None
        if not isinstance(text, str):
            self.bad("missing_field")
            return None
        rid = row.get(self.id_key)
        url, lang = row.get(self.url_key), row.get(self.language_key)
        return self.make(text, str(rid) if rid is not None else doc_id, url=url if isinstance(url, str) else None,
                         language=lang if isinstance(lang, str) else None)

    def read_file(self, filepath: str):
        try:
            yield from self.read(filepath)
        except (OSError, EOFError, ValueError, ET.ParseError) as e:  # unreadable/corrupt file: count, go on
            self.bad("unreadable_file")
            self.stat_update("unreadable_files")
            from datatrove.utils.logging import logger

            logger.warning(f"{self.source}: skipping unreadable file {filepath}: {e}")

    def read(self, filepath: str):
        raise NotImplementedError


class JsonlSource(SourceReader):
    """One JSON object per line (plain, .gz, .zst). `text` names the text field, or `template` formats several
    (e.g. "{question}\\n\\n{answer}")."""

    name = "jsonl"

    def read(self, filepath):
        with self.data_folder.open(filepath, "rb", compression="infer") as f:
            for n, raw in enumerate(f):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self.bad("invalid_utf8", len(raw))
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    self.bad("malformed_json", len(raw))
                    continue
                if not isinstance(row, dict):
                    self.bad("malformed_json", len(raw))
                    continue
                doc = self.from_record(row, f"{filepath}:{n}")
                if doc is not None:
                    yield doc


class ParquetSource(SourceReader):
    name = "parquet"

    def read(self, filepath):
        import pyarrow.parquet as pq

        with self.data_folder.open(filepath, "rb") as f:
            pf = pq.ParquetFile(f)
            n = 0
            for batch in pf.iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    doc = self.from_record(row, f"{filepath}:{n}")
                    n += 1
                    if doc is not None:
                        yield doc


class TextSource(SourceReader):
    """Plain-text files, one document per file, or per chunk of about `chunk_chars` characters cut at blank lines
    (for one long file such as tinyshakespeare)."""

    name = "text"

    def __init__(self, *args, chunk_chars: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.chunk_chars = chunk_chars

    def read(self, filepath):
        with self.data_folder.open(filepath, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.bad("invalid_utf8", len(raw))
            return
        if not self.chunk_chars:
            yield self.make(text, filepath)
            return
        chunk, start = [], 0
        for i, para in enumerate(text.split("\n\n")):
            chunk.append(para)
            if sum(map(len, chunk)) >= self.chunk_chars:
                yield self.make("\n\n".join(chunk), f"{filepath}#{start}")
                chunk, start = [], i + 1
        if chunk:
            yield self.make("\n\n".join(chunk), f"{filepath}#{start}")


UDHR_NS = "{http://efele.net/udhr}"


class UDHRSource(SourceReader):
    """UDHR in XML (`udhr_<key>.xml`): one document per translation, the title/para texts in document order;
    language = ISO 639-3 + script from the root element. `min_stage` uses index.xml (4 = complete texts)."""

    name = "udhr"

    def __init__(self, source, path, funnel, min_stage: int = 4, **kwargs):
        kwargs.setdefault("glob", "udhr_*.xml")
        super().__init__(source, path, funnel, **kwargs)
        self.stages = {}
        index = Path(path) / "index.xml"
        if index.is_file():
            for e in ET.parse(index).getroot():
                self.stages[e.get("f")] = int(e.get("stage") or 0)
        self.min_stage = min_stage

    def read(self, filepath):
        key = Path(filepath).stem.removeprefix("udhr_")
        if self.stages.get(key, 4) < self.min_stage:
            return
        with self.data_folder.open(filepath, "rb") as f:
            root = ET.parse(f).getroot()
        parts = [" ".join("".join(e.itertext()).split()) for e in root.iter()
                 if e.tag in (UDHR_NS + "title", UDHR_NS + "para")]
        lang = f"{root.get('iso639-3')}_{root.get('iso15924')}" if root.get("iso15924") else root.get("iso639-3")
        yield self.make("\n".join(p for p in parts if p), key, language=lang)


class SIB200Source(SourceReader):
    """SIB-200 / FLORES-200 TSVs (`<lang_Script>/<split>.tsv`, columns index_id, category, text): one document per
    `group` consecutive sentences (one per line), language from the folder name."""

    name = "sib200"

    def __init__(self, source, path, funnel, splits=("dev",), group: int = 1, **kwargs):
        splits = [splits] if isinstance(splits, str) else list(splits)
        kwargs.setdefault("glob", "**/" + (f"{splits[0]}.tsv" if len(splits) == 1 else f"{{{','.join(splits)}}}.tsv"))
        super().__init__(source, path, funnel, **kwargs)
        self.splits, self.group = splits, max(1, group)

    def read_files_shard(self, shard):
        yield from super().read_files_shard([f for f in shard if Path(f).stem in self.splits])

    def read(self, filepath):
        lang, split = Path(filepath).parent.name, Path(filepath).stem
        with self.data_folder.open(filepath, "rb") as f:
            lines = f.read().split(b"\n")
        rows = []
        for raw in lines[1:]:
            if not raw.strip():
                continue
            try:
                cols = raw.decode("utf-8").rstrip("\r").split("\t")
            except UnicodeDecodeError:
                self.bad("invalid_utf8", len(raw))
                continue
            if len(cols) != 3:
                self.bad("malformed_row", len(raw))
                continue
            rows.append(cols)
        for i in range(0, len(rows), self.group):
            chunk = rows[i:i + self.group]
            yield self.make("\n".join(c[2].strip() for c in chunk), f"{lang}/{split}/{chunk[0][0]}", language=lang,
                            topic=chunk[0][1] if self.group == 1 else None)


READERS = {"jsonl": JsonlSource, "parquet": ParquetSource, "text": TextSource, "udhr": UDHRSource,
           "sib200": SIB200Source}
