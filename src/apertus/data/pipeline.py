"""`apertus data build RECIPE`: a TOML recipe -> datatrove pipelines -> tokenized shards with a manifest.

Phases (each one datatrove executor run, so a re-run skips the tasks already completed and rewrites only those
that were interrupted):
  filter           readers -> ingest (size, language ID, token count) -> language/quality/opt-out filters -> PII ->
                   toxicity scores -> per-task JSONL
  exact-sigs/find  datatrove exact dedup (hash of the text)
  minhash-*        datatrove MinHash near-dedup (signatures, buckets, clusters), on the exact-deduplicated stream
  tokenize         dedup + toxicity cuts applied -> per-task token parts
  finalize         validation split, deterministic order, shards, documents.parquet, probes, manifest.json
The executor is local (multi-process) by default; `[executor] kind = "slurm"` or `"ray"` hands the same phases to
datatrove's Slurm or Ray executors (chained with `depends`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from ..config import data_root, load_toml
from ..tokenizer import tokenizer_file
from ..util import atomic_write_json, atomic_write_text, sha256_file
from .langid import LangID
from .optout import AI_AGENTS, RobotsOptOut, load_robots
from .readers import READERS
from .shards import (
    TokenizeParts,
    assign_val,
    encode_docs,
    load_tokenizer,
    token_dtype,
    write_index,
    write_shards,
)
from .steps import Funnel, Ingest, LanguageFilter, PIIStep, SaveFunnel, Tracked, quality_filter
from .toxicity import ToxicityCut, ToxicityScore, thresholds

STEP_KEYS = {"langid", "quality", "optout", "pii", "toxicity", "dedup"}


# --- recipe ---------------------------------------------------------------------------------------------------------

def _expand(value, places: dict):
    if isinstance(value, str):
        for k, v in places.items():
            value = value.replace("{" + k + "}", str(v))
        return value
    if isinstance(value, list):
        return [_expand(v, places) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, places) for k, v in value.items()}
    return value


def load_recipe(recipe: str | Path | dict) -> dict:
    """Reads (a TOML path) or takes (a dict) a data recipe, checks it and fills defaults; `{data}`, `{package}` and
    `{recipe}` in strings become the corpus root, the apertus package folder and the recipe's folder."""
    if isinstance(recipe, dict):
        path, raw, base = Path("<recipe>"), copy.deepcopy(recipe), Path.cwd()
    else:
        path = Path(recipe)
        raw, base = load_toml(path), path.resolve().parent
    places = {"data": data_root(), "package": Path(__file__).resolve().parents[1], "recipe": base}
    r = _expand(raw, places)
    r.setdefault("name", path.stem)
    ds = r.setdefault("dataset", {})
    if "tokenizer" not in ds:
        raise ValueError(f"{path}: [dataset] tokenizer = \"path/to/tokenizer.json\" (or \"apertus\") is required")
    ds["tokenizer"] = str(tokenizer_file(ds["tokenizer"]))
    ds.setdefault("seed", 0)
    ds.setdefault("shard_tokens", 1 << 24)
    ds.setdefault("val_fraction", 0.05)
    ds.setdefault("val_min_docs", 10)
    ex = r.setdefault("executor", {})
    ex.setdefault("kind", "local")
    ex.setdefault("tasks", 2)
    ex.setdefault("workers", min(ex["tasks"], os.cpu_count() or 1))
    if ex["kind"] not in ("local", "slurm", "ray"):
        raise ValueError(f"{path}: [executor] kind must be local, slurm or ray, not {ex['kind']!r}")
    sources = r.get("sources") or []
    if not sources:
        raise ValueError(f"{path}: no [[sources]]")
    names = set()
    for s in sources:
        for key in ("name", "reader", "path"):
            if key not in s:
                raise ValueError(f"{path}: every [[sources]] needs `{key}` ({s})")
        if s["reader"] not in READERS:
            raise ValueError(f"{path}: source {s['name']}: reader must be one of {', '.join(READERS)}")
        if s["name"] in names or "/" in s["name"]:
            raise ValueError(f"{path}: source name {s['name']!r} is repeated or contains '/'")
        names.add(s["name"])
    unknown = set(r.get("steps", {})) - STEP_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown [steps.*] {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(STEP_KEYS))}")
    if "probes" in r and r["probes"].get("into") not in names:
        raise ValueError(f"{path}: [probes] into = <source name> is required (the stream that carries the probes)")
    stages = r.get("stages") or []
    for i, st in enumerate(stages):
        if not st.get("name") or not st.get("sources"):
            raise ValueError(f"{path}: every [[stages]] needs name and sources = {{source = weight}}")
        bad = set(st["sources"]) - names
        if bad:
            raise ValueError(f"{path}: stage {st['name']}: unknown source(s) {', '.join(sorted(bad))}")
        if any(w <= 0 for w in st["sources"].values()):
            raise ValueError(f"{path}: stage {st['name']}: weights must be positive")
        langs = st.get("languages")
        if langs is not None and (not isinstance(langs, list) or not langs or
                                  not all(isinstance(x, str) for x in langs)):
            raise ValueError(f"{path}: stage {st['name']}: languages must be a non-empty list of language codes "
                             f"(e.g. [\"deu_Latn\", \"code\"]), not {langs!r}")
        if i < len(stages) - 1 and not st.get("tokens"):
            raise ValueError(f"{path}: stage {st['name']}: every stage but the last needs a token budget (tokens)")
    return r


# --- phases ---------------------------------------------------------------------------------------------------------

class RankReader(PipelineStep):
    """Reads back the filter phase's JSONL of the same task (rank), in order: the dedup steps index documents by
    their position in this stream."""

    name = "intermediate"
    type = "📖 - READER"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import orjson

        path = Path(self.folder) / f"{rank:05d}.jsonl"
        if not path.exists():
            return
        with open(path, "rb") as f:
            for line in f:
                d = orjson.loads(line)
                yield Document(text=d["text"], id=d["id"], metadata=d.get("metadata", {}))


def _text(doc) -> bytes:
    return doc.text.encode("utf-8", "surrogatepass")


def _sources(r: dict, funnel: Funnel) -> list:
    readers = []
    for s in r["sources"]:
        opts = {k: v for k, v in s.items() if k not in ("name", "reader", "path", "license")}
        try:
            readers.append(READERS[s["reader"]](s["name"], s["path"], funnel, **opts))
        except TypeError as e:
            raise ValueError(f"source {s['name']}: {e}") from None
    return readers


def _filter_steps(r: dict, w: Path, funnel: Funnel) -> list:
    """Phase 1: read the sources, language ID, quality, opt-out, PII, toxicity scores; written to work/filtered."""
    from datatrove.pipeline.writers import JsonlWriter

    ds, steps = r["dataset"], r.get("steps", {})
    lid_cfg = steps.get("langid")
    lid = LangID(lid_cfg.get("backend", "py3langid"), lid_cfg.get("model")) if lid_cfg is not None else None
    p1 = _sources(r, funnel)
    p1.append(Ingest(funnel, ds["tokenizer"], lid, lid_skip_kinds=(lid_cfg or {}).get("skip_kinds", ["code"]),
                     min_chars=ds.get("min_chars", 1), max_chars=ds.get("max_chars", 1_000_000)))
    if lid_cfg and (lid_cfg.get("min_score") or lid_cfg.get("languages") or lid_cfg.get("drop_mismatch")):
        p1.append(Tracked(LanguageFilter(lid_cfg.get("min_score", 0.0), lid_cfg.get("languages"),
                                         lid_cfg.get("drop_mismatch", False)), "language", funnel))
    if "quality" in steps:
        q = dict(steps["quality"])
        kinds = q.pop("apply_to", ["web"])
        for name, opts in q.items():
            p1.append(Tracked(quality_filter(name, opts), name, funnel, kinds=kinds))
    if "optout" in steps:
        o = steps["optout"]
        if "robots" not in o:
            raise ValueError("[steps.optout] needs robots = \"folder or JSONL of robots.txt snapshots\"")
        p1.append(Tracked(RobotsOptOut(load_robots(o["robots"]), o.get("agents", AI_AGENTS)), "optout", funnel,
                          kinds=o.get("apply_to")))
    if "pii" in steps:
        p = steps["pii"]
        p1.append(PIIStep(funnel, p.get("extended", False), p.get("exact", False),
                          p.get("skip_kinds", ["code", "math"])))
    tox = steps.get("toxicity")
    if tox is not None:
        p1.append(ToxicityScore(str(w / "tox"), tox.get("model", "lexicon"), tox.get("label"),
                                tox.get("languages", ["eng", "zho", "fra", "deu", "ita", "nld", "pol", "spa", "por"]),
                                tox.get("skip_kinds", ["code", "math"])))
    return p1 + [JsonlWriter(str(w / "filtered"), output_filename="${rank}.jsonl", compression=None),
                 SaveFunnel(funnel, str(w / "funnel" / "filter"))]


def phases(r: dict, out: Path) -> list[tuple[str, list, int]]:
    """The (name, pipeline, tasks) of every phase of recipe `r` writing to `out`: filter, the dedup signature and
    matching phases, then dedup filters + toxicity cut + tokenization, then finalize."""
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    from .langid import word_tokenizer

    w, ds, steps, T = out / "work", r["dataset"], r.get("steps", {}), r["executor"]["tasks"]
    out_phases = [("filter", _filter_steps(r, w, Funnel()), T)]
    tox = steps.get("toxicity")
    dd = steps.get("dedup", {})
    exact, minhash = dd.get("exact", "dedup" in steps), dd.get("minhash", "dedup" in steps)
    econf = ExactDedupConfig(content_getter=_text)
    mconf = MinhashConfig(n_grams=dd.get("n_grams", 5), num_buckets=dd.get("num_buckets", 14),
                          hashes_per_bucket=dd.get("hashes_per_bucket", 8),
                          hash_config=HashConfig(precision=64, hash_fc="sha1"))  # datatrove's xxhash path wants bytes
    reader = RankReader(str(w / "filtered"))
    if exact:
        out_phases += [("exact-sigs", [reader, ExactDedupSignature(str(w / "dedup/exact-sigs"), econf)], T),
                       ("exact-find", [ExactFindDedups(str(w / "dedup/exact-sigs"), str(w / "dedup/exact-dups"),
                                                       econf)], 1)]
    if minhash:
        pre = [ExactDedupFilter(str(w / "dedup/exact-dups"), econf)] if exact else []
        out_phases += [
            ("minhash-sigs", [reader, *pre, MinhashDedupSignature(str(w / "dedup/mh-sigs"), mconf,
                                                                  language=word_tokenizer())], T),
            ("minhash-buckets", [MinhashDedupBuckets(str(w / "dedup/mh-sigs"), str(w / "dedup/mh-buckets"),
                                                     config=mconf)], mconf.num_buckets),
            ("minhash-cluster", [MinhashDedupCluster(str(w / "dedup/mh-buckets"), str(w / "dedup/mh-remove"),
                                                     config=mconf)], 1)]
    funnel2 = Funnel()
    p7 = [reader]
    if exact:
        p7.append(Tracked(ExactDedupFilter(str(w / "dedup/exact-dups"), econf), "dedup_exact", funnel2,
                          reason="duplicate"))
    if minhash:
        p7.append(Tracked(MinhashDedupFilter(str(w / "dedup/mh-remove")), "dedup_minhash", funnel2,
                          reason="near_duplicate"))
    if tox is not None:
        p7.append(Tracked(ToxicityCut(str(w / "tox"), tox.get("drop_top", 0.05), tox.get("min_docs", 20)),
                          "toxicity", funnel2))
    p7 += [TokenizeParts(ds["tokenizer"], str(w / "parts")), SaveFunnel(funnel2, str(w / "funnel" / "tokenize"))]
    out_phases.append(("tokenize", p7, T))
    out_phases.append(("finalize", [Finalize(r, str(out))], 1))
    return out_phases


# --- finalize -------------------------------------------------------------------------------------------------------

def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in ("apertus", "datatrove", "tokenizers", "numpy", "pyarrow", "protego", "py3langid", "glin-profanity",
                "fasttext-numpy2-wheel", "torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


class Finalize(PipelineStep):
    """Single task: validation split, probes, deterministic shards, documents.parquet and manifest.json."""

    name = "finalize"
    type = "📦 - SHARDS"

    def __init__(self, recipe: dict, out: str):
        super().__init__()
        self.recipe, self.out = recipe, out

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import numpy as np

        r, out = self.recipe, Path(self.out)
        ds, w = r["dataset"], out / "work"
        tok, bos, eos = load_tokenizer(ds["tokenizer"])
        dtype = token_dtype(tok.get_vocab_size())
        docs, parts = [], {}
        for p in sorted((w / "parts").glob("*.docs.jsonl")):
            rank_ = int(p.name.split(".")[0])
            parts[rank_] = np.memmap(w / "parts" / f"{rank_:05d}.bin", dtype=dtype, mode="r") \
                if (w / "parts" / f"{rank_:05d}.bin").stat().st_size else np.zeros(0, dtype)
            for line in p.read_text(encoding="utf-8").splitlines():
                d = json.loads(line)
                d["_part"] = rank_
                docs.append(d)
        assign_val(docs, ds["val_fraction"], ds["val_min_docs"])
        inline = {}
        probes = []
        if "probes" in r:
            from .probes import make_probes

            pc = r["probes"]
            probes = make_probes(pc["text"], tuple(pc.get("exposures", (1, 4, 16, 64))), pc.get("per_exposure", 4),
                                 pc.get("controls", 16), pc.get("chars", 400),
                                 pc.get("seed", 0))  # not the order seed: a reseed must not change content
            arrays = encode_docs(tok, [p["text"] for p in probes], bos, eos, dtype)
            host = next(s for s in r["sources"] if s["name"] == pc["into"])
            for p, arr in zip(probes, arrays, strict=True):
                p["n_tokens"], p["source"] = len(arr), pc["into"]
                for c in range(p["exposure"]):
                    d = {"id": f"{p['id']}/{c}", "source": pc["into"], "kind": "probe", "split": "train",
                         "language": host.get("language") or "und", "sha256": p["sha256"], "n_tokens": len(arr),
                         "n_bytes": len(p["text"].encode()), "exposure": p["exposure"]}
                    inline[d["id"]] = arr
                    docs.append(d)

        def tokens_of(d):
            if d["id"] in inline and d.get("kind") == "probe":
                return inline[d["id"]]
            return parts[d["_part"]][d["offset"]: d["offset"] + d["n_tokens"]]

        shards = write_shards(docs, tokens_of, out, ds["seed"], ds["shard_tokens"], dtype)
        write_index(docs, out / "documents.parquet")
        if probes:
            atomic_write_text(out / "probes.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in probes))
        funnel = Funnel.load_folder(w / "funnel")
        for d in docs:
            if d.get("kind") != "probe":
                funnel.add(d["source"], d["language"], f"out:{d['split']}", 1, d["n_tokens"], d["n_bytes"])
        self.write_manifest(out, docs, shards, funnel, tok, bos, eos, dtype, probes)
        return
        yield  # a generator, as datatrove expects

    def write_manifest(self, out, docs, shards, funnel, tok, bos, eos, dtype, probes):
        r, ds = self.recipe, self.recipe["dataset"]
        sources = {}
        for d in docs:
            s = sources.setdefault(d["source"], {"kind": next(x.get("kind", "web") for x in r["sources"]
                                                               if x["name"] == d["source"]),
                                                 "train": {"docs": 0, "tokens": 0}, "val": {"docs": 0, "tokens": 0}})
            s[d["split"]]["docs"] += 1
            s[d["split"]]["tokens"] += d["n_tokens"]
        stages = [{"name": s["name"], "sources": s["sources"], "tokens": s.get("tokens")}
                  | ({"languages": s["languages"]} if s.get("languages") else {}) for s in r.get("stages", [])]
        if not stages:
            stages = [{"name": "all", "sources": {k: v["train"]["tokens"] for k, v in sources.items()
                                                  if v["train"]["tokens"]}, "tokens": None}]
        tox = r.get("steps", {}).get("toxicity")
        langs = {d["language"] for d in docs if d["split"] == "train"}
        manifest = {
            "format": "apertus-dataset/1",
            "name": r["name"],
            "recipe": r,
            "versions": versions(),
            "tokenizer": {"path": ds["tokenizer"], "sha256": sha256_file(Path(ds["tokenizer"])),
                          "vocab_size": tok.get_vocab_size(), "bos_id": bos, "eos_id": eos},
            "dtype": np_name(dtype),
            "seed": ds["seed"],
            "index": "documents.parquet",
            "shards": shards,
            "sources": sources,
            "languages": len(langs),
            "stages": stages,
            "toxicity_thresholds": thresholds(out / "work" / "tox", tox.get("drop_top", 0.05),
                                              tox.get("min_docs", 20)) if tox is not None else None,
            "probes": {"file": "probes.jsonl", "into": r["probes"]["into"], "n": len(probes),
                       "exposures": sorted({p["exposure"] for p in probes})} if probes else None,
            "funnel": {"rows": funnel.rows(), "by_source": funnel.summary("source"),
                       "by_language": funnel.summary("language")},
        }
        atomic_write_json(out / "manifest.json", manifest)


def np_name(dtype) -> str:
    import numpy as np

    return np.dtype(dtype).name


# --- executors and the build ----------------------------------------------------------------------------------------

def make_executor(ex: dict, pipeline: list, tasks: int, logging_dir: str, depends=None, name: str = "data"):
    opts = {k: v for k, v in ex.items() if k not in ("kind", "tasks", "workers")}
    if ex["kind"] == "local":
        from datatrove.executor import LocalPipelineExecutor

        # fork: workers inherit the imported modules (importing apertus, i.e. torch, costs ~2 s per process)
        opts.setdefault("start_method", "fork" if sys.platform == "linux" else "forkserver")
        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(ex["workers"], tasks),
                                     logging_dir=logging_dir, depends=depends, **opts)
    if ex["kind"] == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        opts.setdefault("job_name", f"apertus-{name}")
        return SlurmPipelineExecutor(pipeline, tasks=tasks, logging_dir=logging_dir, depends=depends,
                                     workers=ex.get("workers", -1), **opts)
    from datatrove.executor import RayPipelineExecutor

    return RayPipelineExecutor(pipeline, tasks=tasks, workers=ex.get("workers", -1), logging_dir=logging_dir,
                               depends=depends, **opts)


def _fingerprint(r: dict) -> str:
    return hashlib.sha256(json.dumps(r, sort_keys=True, default=str).encode()).hexdigest()


def build(recipe: dict | str | Path, out: str | Path, *, tasks: int | None = None, workers: int | None = None,
          keep_work: bool = False, log=print) -> dict | None:
    """Builds (or resumes) the dataset of `recipe` into `out`; returns the manifest (None when the phases were
    handed to Slurm/Ray, which finish on their own)."""
    r = load_recipe(recipe)
    if tasks:
        r["executor"]["tasks"] = tasks
    if workers:
        r["executor"]["workers"] = workers
    load_tokenizer(r["dataset"]["tokenizer"])  # fail fast on a bad tokenizer path
    out = Path(out)
    w = out / "work"
    stamp = w / "recipe.json"
    if stamp.exists():
        if json.loads(stamp.read_text()).get("fingerprint") != _fingerprint(r):
            raise ValueError(f"{out} holds a build of a different recipe; choose another --out or delete it")
    elif (out / "manifest.json").exists():
        raise ValueError(f"{out} holds a finished dataset of an unknown recipe; choose another --out")
    atomic_write_json(stamp, {"fingerprint": _fingerprint(r), "recipe": r})
    if r["executor"]["kind"] == "local":
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level=os.environ.get("APERTUS_DATA_LOG", "WARNING"))
    plan = phases(r, out)
    os.environ.setdefault("TQDM_DISABLE", "1")  # datatrove's dedup steps draw bars per task; we report per phase
    t0, prev, timings = time.time(), None, []
    for i, (name, pipeline, n) in enumerate(plan, 1):
        ex = make_executor(r["executor"], pipeline, n, str(w / "logs" / name), depends=prev, name=name)
        if r["executor"]["kind"] != "local":
            prev = ex
            continue
        t = time.time()
        ex.run()
        timings.append({"phase": name, "seconds": round(time.time() - t, 2), "tasks": n})
        log(f"  [{i}/{len(plan)}] {name:<16} {n:>3} task(s)  {time.time() - t:6.1f}s")
        with open(w / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), **timings[-1]}) + "\n")
    if prev is not None:
        prev.run()  # launches the whole chain through `depends`
        log(f"submitted {len(plan)} phases to {r['executor']['kind']}; manifest.json appears in {out} when done")
        return None
    manifest = json.loads((out / "manifest.json").read_text())
    if timings:
        manifest["build"] = {"seconds": round(time.time() - t0, 2), "phases": timings,
                             "tasks": r["executor"]["tasks"], "workers": r["executor"]["workers"]}
        atomic_write_json(out / "manifest.json", manifest)
    if not keep_work:
        for sub in ("filtered", "parts", "dedup"):
            shutil.rmtree(w / sub, ignore_errors=True)
    return manifest


# --- report ---------------------------------------------------------------------------------------------------------

def funnel_table(manifest: dict) -> str:
    """The funnel per source: docs and tokens in, each drop step/reason, PII replacements, out (train + val)."""
    by_source = manifest["funnel"]["by_source"]
    lines = [f"{'source':<12} {'event':<34} {'docs':>9} {'tokens':>12}"]
    total = {}
    for source, events in by_source.items():
        order = sorted(events, key=lambda e: (e != "in", e.startswith("out"), e))
        for ev in order:
            row = events[ev]
            what = f"{row['items']:,} replaced" if ev.startswith("pii:") else f"{row['tokens']:>12,}"
            lines.append(f"{source:<12} {ev:<34} {row['docs']:>9,} {what:>12}")
            t = total.setdefault(ev, [0, 0])
            t[0] += row["docs"]
            t[1] += row["tokens"]
    lines.append("-" * 70)
    for ev in ("in", "out:train", "out:val"):
        if ev in total:
            lines.append(f"{'total':<12} {ev:<34} {total[ev][0]:>9,} {total[ev][1]:>12,}")
    lines.append(f"languages in the training split: {manifest['languages']}")
    return "\n".join(lines)


def build_text(manifest: dict, out: str | Path) -> str:
    """The funnel and the totals of a finished local build (`apertus data build`; `build` timed it)."""
    shards = manifest["shards"]
    return (f"{funnel_table(manifest)}\n{len(shards)} shard(s), {sum(s['n_tokens'] for s in shards):,} tokens, "
            f"{manifest['build']['seconds']:.1f}s; manifest: {out}/manifest.json")


def dataset_info(dataset: str | Path) -> str:
    """The funnel and the stages of a built dataset (`apertus data info`)."""
    path = Path(dataset) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a built dataset")
    manifest = json.loads(path.read_text())
    return "\n".join([funnel_table(manifest)] + [
        f"stage {st['name']}: {st['sources']} tokens={st['tokens']}"
        + (f" languages={','.join(st['languages'])}" if st.get("languages") else "") for st in manifest["stages"]])
