"""Training checkpoints: sharded model + optimizer state (torch.distributed.checkpoint), loop state, RNG, data position.

Layout of a run's `checkpoints/` folder:

    step_00001000/            complete checkpoints (`state.json` is written last, then the folder is renamed)
        .metadata, *.distcp   model and optimizer, sharded as they were trained (any world size can load them)
        config.json           the model's Hugging Face config at that step (RoPE θ of the stage included)
        state.json            step, tokens seen, rank 0's data position, anything else the stage keeps
        rank00000.json ...    each rank's RNG states and data position
    .step_00002000.tmp/       a write that was interrupted: ignored, removed by the next save

Writes are atomic: everything goes to the temporary folder, which is renamed only when complete, so a kill at any
moment leaves the previous checkpoints loadable. Old checkpoints are pruned to the newest `keep_last`, except the
permanent ones (every `permanent_every` steps: the intermediate checkpoints a release publishes).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..checkpoint import HUB_FILES, is_pretrained, load_model, resolve_checkpoint_dir, save_model
from ..util import atomic_write_json
from .distributed import Dist, barrier, broadcast_object

STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict):
    torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save/load; that is the intended use here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(root: str | os.PathLike, step: int, model, optimizer, d: Dist, state: dict,
                    rank_state: dict | None = None, keep_last: int = 2, permanent_every: int = 0) -> Path:
    """Write checkpoint `step` under root (all ranks call this). `state`: JSON of rank 0; `rank_state`: per rank."""
    root = Path(root)
    final, tmp = step_dir(root, step), root / f".step_{step:08d}.tmp"
    if d.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    atomic_write_json(tmp / f"rank{d.rank:05d}.json", {"rng": _rng_state(), **(rank_state or {})})
    barrier()
    if d.main:
        atomic_write_json(tmp / "config.json", model.config.to_hf_dict())
        atomic_write_json(tmp / "state.json", dict(state, step=step))
        if final.exists():  # the same step saved again (e.g. a rerun): the new write replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _prune(root, keep_last, permanent_every)
    barrier()
    return final


def _prune(root: Path, keep_last: int, permanent_every: int):
    found = complete_checkpoints(root)
    for p in found[:-keep_last] if keep_last > 0 else []:
        step = int(STEP_DIR.match(p.name).group(1))
        if not (permanent_every and step % permanent_every == 0):
            trash = p.with_name(f".{p.name}.trash")
            os.rename(p, trash)  # gone from the listing at once; the slow delete cannot leave half a checkpoint
            shutil.rmtree(trash, ignore_errors=True)
    for stale in root.glob(".step_*"):
        if stale.name.endswith((".tmp", ".trash")):
            shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike, model, optimizer, d: Dist) -> tuple[dict, dict]:
    """Restore model, optimizer and this rank's RNG from a checkpoint; returns (state, this rank's state)."""
    path = Path(path)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path}: not a complete training checkpoint (no state.json)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    state = json.loads((path / "state.json").read_text())
    mine = path / f"rank{d.rank:05d}.json"
    rank_state = json.loads((mine if mine.exists() else path / "rank00000.json").read_text())
    if mine.exists():  # resuming on another world size keeps rank 0's data position, but not the RNG streams
        _set_rng_state(rank_state["rng"])
    return state, rank_state


def resume_point(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint as rank 0 sees it (the same answer on every rank)."""
    found = latest_checkpoint(root) if int(os.environ.get("RANK", "0")) == 0 else None
    found = broadcast_object(str(found) if found else None)
    return Path(found) if found else None


# --- export to a Hugging Face directory ------------------------------------------------------------------------------


def is_training_checkpoint(ckpt: str | os.PathLike) -> bool:
    """A checkpoint folder, or a run / checkpoints folder holding one (not a Hugging Face directory or hub id)."""
    ckpt = Path(ckpt)
    found = complete_checkpoints(ckpt) or complete_checkpoints(ckpt / "checkpoints")
    return (ckpt / "state.json").exists() or bool(found)


def resolve_checkpoint(ckpt: str | os.PathLike) -> Path:
    """A checkpoint folder as given, or the newest complete one of a run / checkpoints folder."""
    ckpt = Path(ckpt)
    if not (ckpt / "state.json").exists():
        found = latest_checkpoint(ckpt) or latest_checkpoint(ckpt / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"{ckpt}: no complete training checkpoint here")
        ckpt = found
    return ckpt


def default_export_path(ckpt: str | os.PathLike, fmt: str, dtype: str) -> Path:
    """run/export/step_N-DTYPE (hf) or run/export/RUN-step_N-DTYPE.gguf, next to the run's checkpoints."""
    ckpt = resolve_checkpoint(ckpt)
    run = ckpt.parent.parent
    name = f"{ckpt.name}-{dtype}"
    return run / "export" / (f"{run.resolve().name}-{name}.gguf" if fmt == "gguf" else name)


def _tokenizer_files(ckpt: Path, tokenizer: str | os.PathLike | None) -> dict[str, str]:
    """tokenizer.json + tokenizer_config.json (as apertus.tokenizer writes them) from --tokenizer, the checkpoint
    folder or its run's tokenizer/ folder; none when there is none."""
    import tempfile

    from ..tokenizer import Tokenizer

    candidates = [Path(tokenizer)] if tokenizer else [ckpt, ckpt.parent.parent / "tokenizer"]
    for c in candidates:
        file = c / "tokenizer.json" if c.is_dir() else c
        if file.name == "tokenizer.json" and file.exists():
            with tempfile.TemporaryDirectory() as d:
                Tokenizer.from_file(file).save(d)
                return {f.name: f.read_text(encoding="utf-8") for f in Path(d).iterdir()}
    if tokenizer:
        raise FileNotFoundError(f"{tokenizer}: no tokenizer.json")
    return {}


def export_pretrained(spec: str | os.PathLike, out: str | os.PathLike | None = None, fmt: str = "hf",
                      dtype: str = "bf16", quant: str | None = None) -> Path:
    """Convert a Hugging Face checkpoint (a directory or a hub id) to another dtype (`fmt` "hf", tokenizer files,
    chat template and generation config carried over) or to one GGUF file for llama.cpp (`fmt` "gguf", its matrices
    quantized with `quant`, see export_gguf). `out` defaults to NAME-DTYPE (or NAME-DTYPE|QUANT.gguf) here."""
    src = resolve_checkpoint_dir(spec)
    name = Path(spec).resolve().name if Path(spec).exists() else Path(str(spec).partition("@")[0]).name  # a hub id
    if fmt == "gguf":
        from ..export_gguf import export_gguf

        gguf_dtype = {"bf16": "bf16", "fp32": "f32", "f16": "f16"}[dtype]
        return export_gguf(src, Path(out or f"{name}-{quant or dtype}.gguf"), gguf_dtype, quant)
    if fmt != "hf":
        raise ValueError(f"unknown export format {fmt!r}; use hf or gguf")
    keep = set(HUB_FILES) - {"config.json", "model.safetensors.index.json"}  # save_model writes those
    extra = {f.name: f.read_text() for f in sorted(src.iterdir()) if f.name in keep}
    out = Path(out or f"{name}-{dtype}")
    save_model(load_model(src, dtype=dtype), out, dtype=dtype, extra_files=extra)
    return out


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, dtype: str = "bf16",
                      tokenizer: str | os.PathLike | None = None) -> Path:
    """Write a training checkpoint as a Hugging Face Apertus directory (safetensors, config, tokenizer files).

    `ckpt` is a checkpoint folder, or a run / checkpoints folder (its newest complete checkpoint is taken).
    """
    from ..config import load_config
    from ..model import build_model

    ckpt = resolve_checkpoint(ckpt)
    model = build_model(load_config(ckpt), device="meta")
    model.to_empty(device="cpu")
    state = model.state_dict()
    with _single_process_quiet():
        dcp.load({"model": state}, checkpoint_id=ckpt, no_dist=True)
    model.load_state_dict(state)
    save_model(model, out, dtype=dtype, extra_files=_tokenizer_files(ckpt, tokenizer))
    return Path(out)


GGUF_DTYPES = {"fp32": "f32", "bf16": "bf16", "f16": "f16"}


def export_checkpoint_gguf(ckpt: str | os.PathLike, out_file: str | os.PathLike, dtype: str = "bf16",
                           tokenizer: str | os.PathLike | None = None, quant: str | None = None) -> Path:
    """Write a training checkpoint as one GGUF file for llama.cpp (apertus.export_gguf), by way of a temporary
    Hugging Face directory next to `out_file` (bf16 stays bf16 bit for bit; fp32 and f16 go through fp32; `quant`
    quantizes the matrices from there)."""
    import tempfile

    from ..export_gguf import export_gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF dtype {dtype!r} is not supported; use one of {', '.join(GGUF_DTYPES)}")
    ckpt, out_file = resolve_checkpoint(ckpt), Path(out_file)
    if not _tokenizer_files(ckpt, tokenizer):
        raise FileNotFoundError(f"{ckpt}: no tokenizer with this run (a GGUF file holds the vocabulary); pass "
                                "--tokenizer tokenizer.json")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_file.parent, prefix=".export-") as tmp:
        hf = Path(tmp) / out_file.stem  # the directory name becomes the GGUF's general.name
        export_checkpoint(ckpt, hf, dtype="bf16" if dtype == "bf16" else "fp32", tokenizer=tokenizer)
        return export_gguf(hf, out_file, GGUF_DTYPES[dtype], quant)


def export(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None, fmt: str = "hf", dtype: str = "bf16",
           tokenizer: str | os.PathLike | None = None, quant: str | None = None) -> str:
    """`apertus export`: a training checkpoint (or run folder), or a Hugging Face checkpoint directory or hub id, as
    a Hugging Face checkpoint (fmt "hf") or one GGUF file ("gguf", its matrices quantized with `quant`: q8_0,
    q4_k_m, ...); returns a line saying what was written."""
    if fmt == "hf" and dtype == "f16":
        raise ValueError("--dtype f16 is for --format gguf; a Hugging Face export is bf16 or fp32")
    if fmt == "hf" and quant:
        raise ValueError("--quant is for --format gguf; a Hugging Face export is bf16 or fp32")
    kind = "GGUF for llama.cpp" if fmt == "gguf" else "Hugging Face Apertus checkpoint"
    what = f"{kind}, {quant or dtype}"
    if is_pretrained(checkpoint) and not is_training_checkpoint(checkpoint):
        extra = {"quant": quant} if quant else {}
        return f"wrote {export_pretrained(checkpoint, out, fmt=fmt, dtype=dtype, **extra)} ({what})"
    out = out or default_export_path(checkpoint, fmt, quant or dtype)
    if fmt == "gguf":
        return f"wrote {export_checkpoint_gguf(checkpoint, out, dtype, tokenizer, quant)} ({what})"
    return f"wrote {export_checkpoint(checkpoint, out, dtype=dtype, tokenizer=tokenizer)} ({what})"
