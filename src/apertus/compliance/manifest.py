"""Run manifests: every data build and training run writes `run.json`, and `apertus verify` re-hashes what it lists.

run.json (format "apertus-run/1"):
    kind               data | pretrain | sft | align | ...
    created            UTC time the manifest was written
    code               apertus version, git commit and whether the work tree had uncommitted changes
    packages           every installed Python distribution and its version; python
    config             the full resolved configuration (data recipe, training recipe)
    seeds              every seed that decides the result
    hardware           platform, CPU, memory, accelerators
    datasets           built datasets read: path, sha256 of manifest.json and documents.parquet, shards, tokens
    artifacts          {relative path: {sha256, bytes}} of every file the run produced (shards, index, checkpoints)
    tokens, flops, wall_time_s
    energy             an ESTIMATE: device power x wall time x devices (nothing is measured), with its assumptions
    history            later changes made on purpose (e.g. an opt-out removal), each with its report
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

from ..util import atomic_write_json, sha256_file

FORMAT = "apertus-run/1"
RUN_FILE = "run.json"
# Nominal board power for the energy estimate when none is given. GH200 module: the 560 W of docs/recipe.md §4.5.
GPU_POWER_W = {"GH200": 560.0, "H200": 700.0, "H100": 700.0, "A100": 400.0}
DEFAULT_GPU_POWER_W = 700.0
CPU_POWER_PER_CORE_W = 10.0  # a rough per-core share of a server CPU's TDP


# --- facts about the environment ------------------------------------------------------------------------------------

def code_version() -> dict:
    """apertus version and, when the package runs from a git checkout, the commit and whether it is dirty."""
    try:
        version = metadata.version("apertus")
    except metadata.PackageNotFoundError:
        version = None
    out = {"apertus": version, "git_commit": None, "git_dirty": None}
    src = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            status = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            out.update(git_commit=commit.stdout.strip(), git_dirty=bool(status.stdout.strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def package_versions() -> dict:
    pkgs = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            pkgs[name.lower()] = dist.version
    return {"python": platform.python_version(), **dict(sorted(pkgs.items()))}


def hardware() -> dict:
    import torch

    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    out = {"platform": platform.platform(), "machine": platform.machine(), "cpu": _cpu_name(),
           "cpu_count": os.cpu_count(), "memory_gib": mem, "torch": torch.__version__, "torch_threads":
           torch.get_num_threads(), "accelerators": []}
    if torch.cuda.is_available():
        out["accelerators"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        out["cuda"] = torch.version.cuda
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def energy_estimate(wall_time_s: float | None, devices: int | None = None, device_power_w: float | None = None,
                    hw: dict | None = None) -> dict | None:
    """kWh = device power x devices x hours. Power defaults to the accelerator's nominal board power, or on a CPU to
    10 W per thread in use. Labelled as an estimate: nothing is measured (no PUE, no idle or host power)."""
    if wall_time_s is None:
        return None
    hw = hw or hardware()
    accel = hw.get("accelerators") or []
    if device_power_w is None:
        if accel:
            name = accel[0]
            device_power_w = next((w for k, w in GPU_POWER_W.items() if k in name), DEFAULT_GPU_POWER_W)
            basis = f"nominal board power of {name}"
        else:
            device_power_w = CPU_POWER_PER_CORE_W * (hw.get("torch_threads") or 1)
            basis = f"{CPU_POWER_PER_CORE_W:g} W per CPU thread x {hw.get('torch_threads') or 1} threads"
    else:
        basis = "given"
    devices = devices or max(len(accel), 1)
    kwh = device_power_w * devices * wall_time_s / 3600 / 1000
    return {"estimate": True, "kwh": kwh, "device_power_w": device_power_w, "devices": devices,
            "hours": wall_time_s / 3600, "power_basis": basis,
            "method": "ESTIMATE: device power x devices x wall time; not measured (no PUE, host, network, idle)"}


# --- hashing --------------------------------------------------------------------------------------------------------


def expand_artifacts(run_dir: Path, paths) -> list[Path]:
    files = []
    for p in paths:
        p = run_dir / p
        if p.is_dir():
            files += [f for f in sorted(p.rglob("*")) if f.is_file() and ".tmp" not in f.name
                      and not any(part.startswith(".") for part in f.relative_to(run_dir).parts)]
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"artifact {p} does not exist")
    return files


def hash_files(run_dir: Path, files: list[Path]) -> dict:
    """{path relative to run_dir: {sha256, bytes}}; hashed in threads (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        digests = list(ex.map(sha256_file, files))
    return {f.relative_to(run_dir).as_posix(): {"sha256": d, "bytes": f.stat().st_size}
            for f, d in zip(files, digests, strict=True)}


def dataset_ref(dataset_dir: str | Path) -> dict:
    """What a run records about a built dataset it read: enough for `verify` to tell it changed."""
    d = Path(dataset_dir)
    manifest = json.loads((d / "manifest.json").read_text())
    return {"path": str(d.resolve()), "name": manifest.get("name"), "manifest_sha256": sha256_file(d / "manifest.json"),
            "index_sha256": sha256_file(d / manifest.get("index", "documents.parquet")),
            "shards": len(manifest["shards"]), "tokens": sum(s["n_tokens"] for s in manifest["shards"])}


# --- writing --------------------------------------------------------------------------------------------------------


def write_run_manifest(run_dir: str | Path, kind: str, config: dict, seeds: dict, artifacts, *,
                       tokens: int | None = None, flops: float | None = None, wall_time: float | None = None,
                       datasets=(), parents=(), metrics: dict | None = None, devices: int | None = None,
                       device_power_w: float | None = None, extra: dict | None = None) -> dict:
    """Writes `run_dir/run.json` and returns it.

    artifacts: paths (files or folders, relative to run_dir) of everything the run produced; folders are hashed
    file by file. datasets: built dataset folders the run read. parents: run folders it started from (e.g. the
    pretraining run an SFT run continues). tokens/flops/wall_time: seen, spent, seconds."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory not found")
    hw = hardware()
    manifest = {
        "format": FORMAT, "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code": code_version(), "packages": package_versions(), "config": config, "seeds": seeds, "hardware": hw,
        "datasets": [dataset_ref(d) for d in datasets],
        "parents": [{"path": str(Path(p).resolve()), "run_sha256": sha256_file(Path(p) / RUN_FILE)}
                    for p in parents if (Path(p) / RUN_FILE).exists()],
        "artifacts": hash_files(run_dir, expand_artifacts(run_dir, artifacts)),
        "tokens": tokens, "flops": flops, "wall_time_s": wall_time,
        "energy": energy_estimate(wall_time, devices, device_power_w, hw),
        "metrics": metrics or {}, "history": [],
    }
    if extra:
        manifest.update(extra)
    atomic_write_json(run_dir / RUN_FILE, manifest)
    return manifest


def read_run(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: record the run first (`apertus manifest {run_dir}`)")
    m = json.loads(path.read_text())
    if m.get("format") != FORMAT:
        raise ValueError(f"{path}: format {m.get('format')!r}, expected {FORMAT}")
    return m


def refresh_artifacts(run_dir: str | Path, event: dict) -> dict | None:
    """After a deliberate change (an opt-out removal), re-hash the listed artifacts (dropping removed files) and add
    `event` to the history. No run.json: nothing to do."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).exists():
        return None
    m = read_run(run_dir)
    dirs = {p.split("/", 1)[0] for p in m["artifacts"] if "/" in p}
    files = [p for p in m["artifacts"] if "/" not in p and (run_dir / p).exists()]
    m["artifacts"] = hash_files(run_dir, expand_artifacts(run_dir, sorted(dirs) + files))
    m["history"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **event})
    atomic_write_json(run_dir / RUN_FILE, m)
    return m


def record_data_build(dataset_dir: str | Path, wall_time: float | None = None) -> dict:
    """run.json for a built dataset (`apertus data build`), from its manifest.json."""
    d = Path(dataset_dir)
    mpath = d / "manifest.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"{d}: not a built dataset (no manifest.json)")
    man = json.loads(mpath.read_text())
    artifacts = ["manifest.json", man.get("index", "documents.parquet"), "shards"]
    if (d / "probes.jsonl").exists():
        artifacts.append("probes.jsonl")
    recipe = man["recipe"]
    seeds = {"order": man.get("seed"), "probes": (recipe.get("probes") or {}).get("seed", 0) if recipe.get("probes")
             else None}
    if wall_time is None:
        wall_time = (man.get("build") or {}).get("seconds")
    tokens = sum(s["n_tokens"] for s in man["shards"])
    return write_run_manifest(d, "data", recipe, seeds, artifacts, tokens=tokens, flops=0.0, wall_time=wall_time,
                              devices=1, metrics={"documents": sum(s["n_docs"] for s in man["shards"]),
                                                  "languages": man.get("languages")})


def build_recorded(recipe, out: str | Path, *, tasks: int | None = None, workers: int | None = None,
                   keep_work: bool = False) -> dict | None:
    """`apertus data build`: `data.pipeline.build`, then the dataset's run.json with the build's wall time. Returns
    the manifest, or None (and records nothing yet) when the phases were handed to Slurm/Ray."""
    from ..data.pipeline import build

    t = time.time()
    manifest = build(recipe, out, tasks=tasks, workers=workers, keep_work=keep_work)
    if manifest is not None:
        record_data_build(out, wall_time=time.time() - t)
    return manifest


def record_training_run(run_dir: str | Path, kind: str = "pretrain", wall_time: float | None = None,
                        parents=()) -> dict:
    """run.json for a run of the training loop (`apertus train`, SFT, QRPO) from what the loop leaves in its folder:
    recipe.json (the resolved recipe), metrics.jsonl, checkpoints/step_*/ (config.json, state.json, shards), an
    optional tokenizer/ and exported Hugging Face folders. FLOPs = sum over stages of tokens x the model's FLOPs per
    token at the stage's sequence length (`ApertusConfig.flops_per_token`)."""
    from ..config import load_config

    run = Path(run_dir)
    rpath = run / "recipe.json"
    if not rpath.is_file():
        raise FileNotFoundError(f"{run}: no recipe.json, not a training run folder")
    recipe = json.loads(rpath.read_text())
    rows = []
    if (run / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r and "tokens" in r]
    ckpts = sorted((run / "checkpoints").glob("step_*/state.json")) if (run / "checkpoints").is_dir() else []
    tokens = steps[-1]["tokens"] if steps else None
    if tokens is None and ckpts:
        tokens = json.loads(ckpts[-1].read_text()).get("tokens")
    flops = None
    if ckpts and steps:
        cfg = load_config(ckpts[-1].parent)
        stages = recipe.get("stages") or [{"start_step": 0, "seq_len": recipe["train"]["seq_len"]}]
        flops, prev = 0.0, 0
        for r in steps:
            st = next(s for s in reversed(stages) if r["step"] - 1 >= s.get("start_step", 0))
            flops += (r["tokens"] - prev) * cfg.flops_per_token(st.get("seq_len") or recipe["train"]["seq_len"])
            prev = r["tokens"]
    if wall_time is None and len(steps) > 1:  # the first step's own duration is not in the log: add the mean
        span = steps[-1]["time"] - steps[0]["time"]
        wall_time = span * len(steps) / (len(steps) - 1)
    artifacts = [p for p in ("recipe.json", "metrics.jsonl", "checkpoints", "tokenizer") if (run / p).exists()]
    artifacts += sorted(p.parent.name for p in run.glob("*/config.json")
                        if p.parent.name not in ("checkpoints", "tokenizer") and any(p.parent.glob("*.safetensors")))
    train = recipe.get("train", {})
    seeds = {"train": train.get("seed"), "stages": [s.get("seed") for s in recipe.get("stages", [])]}
    dataset = (recipe.get("data") or {}).get("dataset")
    last = steps[-1] if steps else {}
    metrics = {k: v for k, v in last.items() if k == "step" or k == "loss" or k.startswith("val/")}
    return write_run_manifest(run, kind, recipe, seeds, artifacts, tokens=tokens, flops=flops, wall_time=wall_time,
                              datasets=[dataset] if dataset and Path(dataset, "manifest.json").exists() else [],
                              parents=parents, metrics=metrics)


def record(run_dir: str | Path, kind: str | None = None) -> dict:
    """run.json for a folder after the fact: a built dataset or a training run (detected from its files)."""
    d = Path(run_dir)
    if (d / "manifest.json").exists() and (d / "documents.parquet").exists():
        return record_data_build(d)
    if (d / "recipe.json").exists():
        return record_training_run(d, kind or "pretrain")
    raise ValueError(f"{d}: neither a built dataset (manifest.json) nor a training run (recipe.json)")


def record_text(manifest: dict, run_dir: str | Path) -> str:
    """What `record` wrote, in one line."""
    energy = manifest["energy"]["kwh"] if manifest["energy"] else "-"
    return (f"wrote {run_dir}/{RUN_FILE} ({manifest['kind']}: {len(manifest['artifacts'])} artifacts hashed, "
            f"tokens {manifest['tokens']}, energy estimate {energy} kWh)")


# --- verification ---------------------------------------------------------------------------------------------------

def verify(run_dir: str | Path) -> dict:
    """Re-hashes everything run.json lists, the datasets it read (manifest, index and every shard against the
    dataset's manifest) and the runs it started from. Returns {"checked": n, "problems": [{path, problem}]}.
    A built dataset without run.json is checked against its manifest's shard hashes."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: not a directory")
    problems, checked = [], 0

    def check(path: Path, sha: str, size: int | None = None):
        nonlocal checked
        checked += 1
        if not path.is_file():
            problems.append({"path": str(path), "problem": "missing"})
        elif size is not None and path.stat().st_size != size:
            problems.append({"path": str(path), "problem": f"size {path.stat().st_size} != recorded {size}"})
        elif sha256_file(path) != sha:
            problems.append({"path": str(path), "problem": "sha256 differs from the recorded one"})

    if (run / RUN_FILE).exists():
        m = read_run(run)
        for rel, rec in m["artifacts"].items():
            check(run / rel, rec["sha256"], rec.get("bytes"))
        for ds in m.get("datasets", []):
            d = Path(ds["path"])
            check(d / "manifest.json", ds["manifest_sha256"])
            check(d / "documents.parquet", ds["index_sha256"])
            if (d / "manifest.json").is_file():
                checked += _check_shards(d, problems)
        for p in m.get("parents", []):
            check(Path(p["path"]) / RUN_FILE, p["run_sha256"])
    elif (run / "manifest.json").exists():
        checked += _check_shards(run, problems)
    else:
        raise FileNotFoundError(f"{run}: no run.json (and not a built dataset); nothing to verify")
    return {"checked": checked, "problems": problems}


def verify_text(result: dict, run_dir: str | Path) -> str:
    """A line per problem `verify` found, then the count."""
    n = len(result["problems"])
    lines = [f"MISMATCH {p['path']}: {p['problem']}" for p in result["problems"]]
    return "\n".join(lines + [f"{run_dir}: {result['checked']} files checked, "
                              + (f"{n} problem(s)" if n else "all hashes match")])


def _check_shards(dataset: Path, problems: list) -> int:
    man = json.loads((dataset / "manifest.json").read_text())
    for s in man["shards"]:
        p = dataset / s["path"]
        if not p.is_file():
            problems.append({"path": str(p), "problem": "missing"})
        elif sha256_file(p) != s["sha256"]:
            problems.append({"path": str(p), "problem": "sha256 differs from the dataset manifest"})
    return len(man["shards"])
