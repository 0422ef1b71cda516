"""Retrospective removal from a built dataset, and the answer to "was this in the training data?".

`apply_optout(dataset, robots=..., urls=..., domains=..., text_hashes=...)` finds every affected document through
`documents.parquet` (each document keeps its source, URL and the sha256 of its text), rewrites only the shards that
hold one (the other documents' tokens are copied unchanged, in the same order), updates the index, manifest.json
(shards, per-source counts, the funnel gains `optout_retro:<reason>` rows, an `optout` history) and run.json, and
writes a removal report `optout/removal-<time>.json`. The robots.txt verdicts are those of the build-time filter
(`apertus.data.optout`: docs/recipe.md §5's AI agents and `*`, protego).

The new files are written under temporary names and swapped in following a journal (`optout.journal.json`), so an
interrupted removal is finished by the next `optout` command instead of leaving shards and index out of step.

`check(dataset, query)` answers for a URL, a sha256 of a text, or a text: which documents (source, language, split,
shard, offset) and which curriculum stages; a text is also searched as a token sequence inside every shard, so a
passage within a longer document is found too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ..data.optout import AI_AGENTS, disallowed_agents, host_of, load_robots
from ..util import atomic_write_json
from .manifest import refresh_artifacts

JOURNAL = "optout.journal.json"
HEX64 = re.compile(r"^[0-9a-f]{64}$")


# --- inputs ---------------------------------------------------------------------------------------------------------

def read_list(path: str | Path | None) -> list[str]:
    """One entry per line; blank lines and `#` comments skipped."""
    if path is None:
        return []
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: removal list not found")
    return [s for line in p.read_text(encoding="utf-8").splitlines() if (s := line.split("#", 1)[0].strip())]


def normalize_url(url: str) -> str:
    """Scheme and host lower-cased, fragment dropped: how a removal request is compared with a document's URL."""
    parts = urlsplit(url.strip())
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", parts.query, ""))


def _load_dataset(dataset: str | Path) -> tuple[Path, dict, list[dict]]:
    d = Path(dataset)
    if not (d / "manifest.json").is_file():
        raise FileNotFoundError(f"{d}: not a built dataset (no manifest.json); run `apertus data build`")
    _finish_journal(d)
    from ..data.shards import read_index

    manifest = json.loads((d / "manifest.json").read_text())
    return d, manifest, read_index(d).to_pylist()


# --- finding what to remove -----------------------------------------------------------------------------------------

def find_removals(docs: list[dict], *, robots: dict[str, str] | None = None, urls=(), domains=(), text_hashes=(),
                  agents=AI_AGENTS) -> tuple[dict[int, list[str]], dict]:
    """{row: [reasons]} of the documents to remove, and the requests that matched nothing."""
    want_urls = {normalize_url(u): u for u in urls}
    want_domains = {d.lower().strip(".") for d in domains}
    want_hashes = {h.lower() for h in text_hashes}
    bad = [h for h in want_hashes if not HEX64.match(h)]
    if bad:
        raise ValueError(f"text hashes must be sha256 hex digests (64 characters), e.g. not {bad[0]!r}")
    found, hit = defaultdict(list), defaultdict(set)
    for i, doc in enumerate(docs):
        url = doc.get("url")
        if url:
            host = host_of(url)
            name = host.rsplit(":", 1)[0]
            if robots and host in robots:
                ag = disallowed_agents(url, robots[host], agents)
                if ag:
                    found[i].append("robots:" + ",".join(ag))
            nu = normalize_url(url)
            if nu in want_urls:
                found[i].append("url")
                hit["urls"].add(nu)
            dom = next((dm for dm in want_domains if name == dm or name.endswith("." + dm)), None)
            if dom:
                found[i].append("domain")
                hit["domains"].add(dom)
        if doc["sha256"] in want_hashes:
            found[i].append("text_hash")
            hit["text_hashes"].add(doc["sha256"])
    unmatched = {"urls": sorted(u for n, u in want_urls.items() if n not in hit["urls"]),
                 "domains": sorted(want_domains - hit["domains"]),
                 "text_hashes": sorted(want_hashes - hit["text_hashes"])}
    return dict(found), unmatched


# --- rewriting ------------------------------------------------------------------------------------------------------

def _finish_journal(d: Path) -> None:
    """Completes a swap (or one a crash interrupted): the renames whose temporary file still exists, the deletions,
    then run.json is re-hashed with the removal in its history."""
    j = d / JOURNAL
    if not j.exists():
        return
    plan = json.loads(j.read_text())
    for tmp, final in plan["renames"]:
        if (d / tmp).exists():
            os.replace(d / tmp, d / final)
    for gone in plan["deletes"]:
        (d / gone).unlink(missing_ok=True)
    refresh_artifacts(d, plan["event"])
    j.unlink()


def _rewrite_shard(d: Path, shard: str, rows: list[dict], remove: set[int], dtype) -> tuple[str | None, dict]:
    """Writes `<shard>.optout-tmp` with the kept documents' tokens (same order) and sets their new offsets."""
    old = np.memmap(d / shard, dtype=dtype, mode="r")
    tmp = shard + ".optout-tmp"
    h, offset, n_docs = hashlib.sha256(), 0, 0
    with open(d / tmp, "wb") as f:
        for r in rows:
            if r["_row"] in remove:
                continue
            b = np.ascontiguousarray(old[r["offset"]: r["offset"] + r["n_tokens"]]).tobytes()
            f.write(b)
            h.update(b)
            r["offset"] = offset
            offset, n_docs = offset + r["n_tokens"], n_docs + 1
    if n_docs == 0:
        (d / tmp).unlink()
        return None, {"n_tokens": 0, "n_docs": 0}
    return tmp, {"n_tokens": offset, "n_docs": n_docs, "sha256": h.hexdigest()}


def _removal_report(manifest: dict, docs: list[dict], found: dict[int, list[str]], unmatched: dict, criteria: dict,
                    stamp: str, dry_run: bool) -> dict:
    """The report of what `found` removes: every document with its reasons, and totals by source, language, reason."""
    report = {
        "format": "apertus-optout-report/1", "dataset": manifest.get("name"), "time": stamp, "dry_run": dry_run,
        "criteria": criteria, "unmatched_requests": unmatched, "removed": {"docs": 0, "tokens": 0, "bytes": 0},
        "by_source": {}, "by_language": {}, "by_reason": {}, "documents": [], "shards_rebuilt": [],
        "shards_untouched": 0,
    }
    for i, reasons in sorted(found.items()):
        doc = docs[i]
        report["documents"].append({k: doc.get(k) for k in ("id", "source", "language", "split", "url", "sha256",
                                                            "shard", "offset", "n_tokens", "kind")}
                                   | {"reasons": reasons})
        for key, val in (("by_source", doc["source"]), ("by_language", doc["language"])):
            row = report[key].setdefault(val, {"docs": 0, "tokens": 0})
            row["docs"] += 1
            row["tokens"] += doc["n_tokens"]
        for r in {x.split(":", 1)[0] for x in reasons}:
            report["by_reason"][r] = report["by_reason"].get(r, 0) + 1
        report["removed"]["docs"] += 1
        report["removed"]["tokens"] += doc["n_tokens"]
        report["removed"]["bytes"] += doc.get("n_bytes") or 0
    report["shards_untouched"] = len(manifest["shards"]) - len({docs[i]["shard"] for i in found})
    return report


def _rewrite_shards(d: Path, manifest: dict, docs: list[dict], remove: set[int], report: dict):
    """Writes the affected shards under temporary names; returns the (tmp, final) renames, the shards left empty
    (to delete) and the manifest records of the shards that remain."""
    dtype = np.dtype(manifest["dtype"])
    by_shard = defaultdict(list)
    for i, doc in enumerate(docs):
        doc["_row"] = i
        by_shard[doc["shard"]].append(doc)
    renames, deletes = [], []
    records = {s["path"]: s for s in manifest["shards"]}
    for shard in sorted({docs[i]["shard"] for i in remove}):
        rows = sorted(by_shard[shard], key=lambda r: r["offset"])
        tmp, rec = _rewrite_shard(d, shard, rows, remove, dtype)
        old = records[shard]
        report["shards_rebuilt"].append({"path": shard, "old_sha256": old["sha256"], "new_sha256": rec.get("sha256"),
                                         "old_tokens": old["n_tokens"], "new_tokens": rec["n_tokens"],
                                         "removed_docs": old["n_docs"] - rec["n_docs"]})
        if tmp is None:
            deletes.append(shard)
            del records[shard]
        else:
            renames.append([tmp, shard])
            old.update(rec)
    for doc in docs:
        doc.pop("_row", None)
    return renames, deletes, records


def _update_manifest(manifest: dict, docs: list[dict], found: dict[int, list[str]], kept: list[dict],
                     records: dict, report: dict, stamp: str) -> str:
    """Shards, per-source counts, funnel rows, languages and the removal history; returns the report's path."""
    from ..data.steps import Funnel

    manifest["shards"] = [s for s in manifest["shards"] if s["path"] in records]
    funnel = Funnel()
    funnel.merge_rows(manifest["funnel"]["rows"])
    for i, reasons in found.items():
        doc = docs[i]
        src = manifest["sources"][doc["source"]][doc["split"]]
        src["docs"] -= 1
        src["tokens"] -= doc["n_tokens"]
        reason = reasons[0].split(":", 1)[0]
        funnel.add(doc["source"], doc["language"], f"optout_retro:{reason}", 1, doc["n_tokens"], doc.get("n_bytes")
                   or 0)
        funnel.add(doc["source"], doc["language"], f"out:{doc['split']}", -1, -doc["n_tokens"],
                   -(doc.get("n_bytes") or 0))
    manifest["funnel"] = {"rows": funnel.rows(), "by_source": funnel.summary("source"),
                          "by_language": funnel.summary("language")}
    manifest["languages"] = len({doc["language"] for doc in kept if doc["split"] == "train"})
    report_rel = f"optout/removal-{stamp}.json"
    manifest.setdefault("optout", []).append({"time": stamp, "report": report_rel, **report["removed"],
                                              "criteria": report["criteria"]})
    return report_rel


def apply_optout(dataset: str | Path, *, robots: str | Path | dict | None = None, urls=(), domains=(),
                 text_hashes=(), agents=AI_AGENTS, dry_run: bool = False) -> dict:
    """Removes every matching document from the built dataset; returns the removal report (also written to
    `optout/removal-<time>.json` unless dry_run)."""
    from ..data.shards import write_index

    d, manifest, docs = _load_dataset(dataset)
    robots_map = load_robots(robots) if isinstance(robots, (str, Path)) else robots
    if not (robots_map or urls or domains or text_hashes):
        raise ValueError("nothing to remove: give --robots, --urls, --domains or --text-hashes")
    found, unmatched = find_removals(docs, robots=robots_map, urls=urls, domains=domains, text_hashes=text_hashes,
                                     agents=agents)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    criteria = {"robots_hosts": len(robots_map or {}), "robots_source": str(robots) if isinstance(
        robots, (str, Path)) else None, "agents": list(agents) if robots_map else None, "urls": len(urls),
        "domains": len(domains), "text_hashes": len(text_hashes)}
    report = _removal_report(manifest, docs, found, unmatched, criteria, stamp, dry_run)
    if dry_run or not found:
        if not dry_run:
            _write_report(d, report, stamp)
        return report

    renames, deletes, records = _rewrite_shards(d, manifest, docs, set(found), report)
    kept = [doc for i, doc in enumerate(docs) if i not in found]
    write_index(kept, d / "documents.parquet.optout-tmp.parquet")
    renames.append(["documents.parquet.optout-tmp.parquet", "documents.parquet"])
    report_rel = _update_manifest(manifest, docs, found, kept, records, report, stamp)
    atomic_write_json(d / "manifest.json.optout-tmp", manifest)
    renames.append(["manifest.json.optout-tmp", "manifest.json"])

    _write_report(d, report, stamp)
    atomic_write_json(d / JOURNAL, {"renames": renames, "deletes": deletes,
                                    "event": {"event": "optout", "report": report_rel, **report["removed"]}})
    _finish_journal(d)
    return report


def _write_report(d: Path, report: dict, stamp: str) -> Path:
    (d / "optout").mkdir(exist_ok=True)
    path = d / "optout" / f"removal-{stamp}.json"
    atomic_write_json(path, report)
    return path


# --- check ----------------------------------------------------------------------------------------------------------

def _stages_of(manifest: dict, doc: dict) -> list[str]:
    if doc["split"] != "train":
        return []
    return [s["name"] for s in manifest["stages"] if doc["source"] in s["sources"]
            and (not s.get("languages") or doc.get("language") in s["languages"])]


def _find_tokens(d: Path, manifest: dict, ids: list[int]) -> list[tuple[str, int]]:
    """(shard, token position) of every occurrence of the token sequence `ids` in the shards."""
    dtype, out = np.dtype(manifest["dtype"]), []
    pattern = np.asarray(ids, dtype=np.int64)
    for s in manifest["shards"]:
        arr = np.memmap(d / s["path"], dtype=dtype, mode="r")
        if len(arr) < len(pattern):
            continue
        cand = np.flatnonzero(arr[: len(arr) - len(pattern) + 1] == pattern[0])
        for j in range(1, len(pattern)):
            cand = cand[arr[cand + j] == pattern[j]]
            if not len(cand):
                break
        out += [(s["path"], int(c)) for c in cand]
    return out


def check(dataset: str | Path, query: str, max_hits: int = 100) -> dict:
    """Whether and where `query` (a URL, a sha256 of a document text, or a text) is in the dataset."""
    d, manifest, docs = _load_dataset(dataset)
    query = query.strip()
    if not query:
        raise ValueError("empty query: give a URL, a sha256 or a text")
    result = {"query": query, "documents": [], "removed_before": []}
    if re.match(r"^[a-z][a-z0-9+.-]*://", query, re.I):
        result["kind"] = "url"
        want = normalize_url(query)
        hits = [(doc, None) for doc in docs if doc.get("url") and normalize_url(doc["url"]) == want]
        host = host_of(query)
        result["same_host_documents"] = sum(1 for doc in docs if doc.get("url") and host_of(doc["url"]) == host)
        match_removed = lambda r: r.get("url") and normalize_url(r["url"]) == want  # noqa: E731
    elif HEX64.match(query.lower()):
        result["kind"] = "sha256"
        hits = [(doc, None) for doc in docs if doc["sha256"] == query.lower()]
        match_removed = lambda r: r.get("sha256") == query.lower()  # noqa: E731
    else:
        result["kind"] = "text"
        digest = hashlib.sha256(query.encode("utf-8", "surrogatepass")).hexdigest()
        hits = [(doc, None) for doc in docs if doc["sha256"] == digest]
        hits += _text_hits(d, manifest, docs, query, {id(doc) for doc, _ in hits})
        match_removed = lambda r: r.get("sha256") == digest  # noqa: E731
    for doc, pos in hits[:max_hits]:
        row = {k: doc.get(k) for k in ("id", "source", "kind", "language", "split", "url", "sha256", "shard", "offset",
                                       "n_tokens")}
        row["match"] = "whole document" if pos is None else f"inside, at token {pos} of the document"
        row["stages"] = _stages_of(manifest, doc)
        result["documents"].append(row)
    result["found"], result["n_documents"] = bool(hits), len(hits)
    for rep in sorted((d / "optout").glob("removal-*.json")) if (d / "optout").is_dir() else []:
        for r in json.loads(rep.read_text()).get("documents", []):
            if match_removed(r):
                result["removed_before"].append({"report": rep.relative_to(d).as_posix(), "id": r["id"],
                                                 "reasons": r["reasons"]})
    return result


def _text_hits(d: Path, manifest: dict, docs: list[dict], text: str, seen: set) -> list[tuple[dict, int]]:
    """Documents whose text contains `text`: its tokens (without the first and last, which a BPE may merge
    differently at the edges of a passage) are searched in the shards, then the document is decoded to confirm."""
    from ..data.shards import load_tokenizer

    tok_path = manifest["tokenizer"]["path"]
    if not Path(tok_path).is_file():
        return []
    tok, _, _ = load_tokenizer(tok_path)
    ids = tok.encode(text, add_special_tokens=False).ids
    inner = ids[1:-1] if len(ids) > 4 else ids
    if not inner:
        return []
    starts = defaultdict(list)  # shard -> sorted (offset, doc)
    for doc in docs:
        starts[doc["shard"]].append((doc["offset"], doc))
    for v in starts.values():
        v.sort(key=lambda x: x[0])
    dtype, out = np.dtype(manifest["dtype"]), []
    for shard, pos in _find_tokens(d, manifest, inner):
        offsets = [o for o, _ in starts[shard]]
        k = int(np.searchsorted(offsets, pos, side="right")) - 1
        if k < 0:
            continue
        doc = starts[shard][k][1]
        if id(doc) in seen or pos >= doc["offset"] + doc["n_tokens"]:
            continue
        arr = np.memmap(d / shard, dtype=dtype, mode="r")[doc["offset"]: doc["offset"] + doc["n_tokens"]]
        if text in tok.decode(arr.tolist(), skip_special_tokens=True):
            seen.add(id(doc))
            out.append((doc, pos - doc["offset"]))
    return out


# --- as text (`apertus optout apply|check`) --------------------------------------------------------------------------


def removal_text(report: dict, dataset: str | Path) -> str:
    """What `apply_optout` removed (or, dry run, would remove), in a few lines."""
    r = report["removed"]
    lines = [f"{'would remove' if report['dry_run'] else 'removed'} {r['docs']:,} document(s), {r['tokens']:,} tokens; "
             f"reasons {report['by_reason']}; shards rebuilt {len(report['shards_rebuilt'])}, untouched "
             f"{report['shards_untouched']}"]
    lines += [f"  {len(vals)} of the {key} matched no document (not in this dataset)"
              for key, vals in report["unmatched_requests"].items() if vals]
    if not report["dry_run"]:
        lines.append(f"report: {dataset}/optout/removal-{report['time']}.json")
    return "\n".join(lines)


def check_text(result: dict, dataset: str | Path) -> str:
    """Where `check` found the query, in a line per document (and per earlier removal)."""
    lines = [] if result["found"] else [f"not in {dataset} ({result['kind']})"]
    for d in result["documents"]:
        where = f"stages {', '.join(d['stages'])}" if d["stages"] else "held out (validation split, not trained on)"
        lines.append(f"FOUND {d['match']}: document {d['id']} ({d['source']}, {d['language']}, {d['split']}) in "
                     f"{d['shard']} at token {d['offset']:,}; {where}")
    if result["n_documents"] > len(result["documents"]):
        lines.append(f"... {result['n_documents'] - len(result['documents'])} more")
    lines += [f"REMOVED earlier: document {r['id']} ({', '.join(r['reasons'])}), report {r['report']}"
              for r in result["removed_before"]]
    return "\n".join(lines)
