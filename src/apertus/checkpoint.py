"""Hugging Face checkpoint directories: config.json + model.safetensors (or shards + index) + generation_config.json.

Loading is memory-frugal: the model is built on the meta device, and a tensor stored in the dtype asked for becomes a
parameter as a view of the memory-mapped file (safetensors' own mmap, copy-on-write), so its memory is the page cache's
and no copy is made: loading reads nothing up front, and a second start finds the weights already in memory. A tensor
to be converted is read straight from the file into fresh memory and converted one at a time, so that the mapping never
holds a second copy beside the converted one.
Pickle files are refused unless asked for, and then only with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import PRESETS, ApertusConfig, load_config, preset
from .model import Apertus, build_model
from .util import atomic_write_json

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Fixed xIELU constants: some converters drop these buffers; their values are known.
OPTIONAL_KEYS = ("mlp.act_fn.beta", "mlp.act_fn.eps")
INSTRUCT_STOP_IDS = [2, 68, 72]  # </s>, <|assistant_end|>, <|tools_suffix|> (docs/recipe.md §1.2)
# What a checkpoint needs from a hub repository: weights (safetensors only, never pickles), configs, tokenizer files
# and the chat template; a repository's other files (original/, *.bin, *.gguf, images) are never downloaded.
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
# `org/name` or `org/name@revision` (a branch, tag or commit): huggingface_hub's repo-id alphabet, one slash.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32 or bf16")
    return names[dtype]


# --- finding -------------------------------------------------------------------------------------------------------


def resolve_checkpoint_dir(spec: str | os.PathLike, allow_preset: bool = False, files: list[str] = HUB_FILES) -> Path:
    """The local directory of a checkpoint given as a path or a Hugging Face hub id (`org/name[@revision]`).

    A local path wins when it exists. A hub id is resolved by `huggingface_hub.snapshot_download` with only the files a
    checkpoint needs (HUB_FILES), so the standard cache, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN apply as for any
    Hugging Face tool; a cached revision is used without the network. With `allow_preset`, a preset name that is not
    a local path comes back unchanged (as a Path) for `load_model` to build. `files` narrows what a hub id fetches
    (e.g. ["config.json"] for `apertus info`).
    """
    path = Path(spec)
    if path.exists() or (allow_preset and str(spec) in PRESETS):
        return path
    m = HUB_ID.match(str(spec))
    if m is None:
        presets = f"nor a preset ({', '.join(PRESETS)}), " if allow_preset else ""
        raise FileNotFoundError(f"{spec}: no such checkpoint directory ({presets}nor a Hugging Face hub id "
                                "org/name[@revision])")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, revision = m["repo"], m["revision"]
    where = f"the Hugging Face cache {constants.HF_HUB_CACHE}" + (
        " (HF_HUB_OFFLINE is set, so not the hub)" if constants.HF_HUB_OFFLINE else " and the hub")
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=files))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        reason = " ".join(str(e).split())  # one line: hub errors span several
        raise FileNotFoundError(f"{spec}: not a local directory, and hub model {repo} (revision "
                                f"{revision or 'main'}) not found in {where}: {reason[:300]}") from None


def is_pretrained(spec: str | os.PathLike) -> bool:
    """Whether `spec` names a Hugging Face checkpoint: a directory with config.json or, not being a local path, a hub
    id (whether it exists is for resolve_checkpoint_dir to find out)."""
    path = Path(spec)
    return (path / "config.json").is_file() if path.exists() else HUB_ID.match(str(spec)) is not None


# --- reading ---------------------------------------------------------------------------------------------------------


def _read_safetensors(file: Path, map_dtype: torch.dtype | None = None):
    """Yield (name, tensor) from a .safetensors file: a view of the mapped file where the tensor is stored in
    `map_dtype` or is not floating point (nothing to convert), else (and always without `map_dtype`) read directly
    into a fresh tensor for the caller to convert."""
    mapped = None
    with open(file, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not a safetensors file ({e})") from None
        base, size = 8 + n, os.fstat(f.fileno()).st_size
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            stored = SAFETENSORS_DTYPES[info["dtype"]]
            if map_dtype is not None and (stored == map_dtype or not stored.is_floating_point):
                if base + end > size:
                    raise ValueError(f"{file}: tensor {name} is truncated")
                try:  # the file is mapped once; its tensors keep the mapping alive
                    mapped = mapped or safe_open(file, framework="pt")
                    t = mapped.get_tensor(name)
                except SafetensorError as e:
                    raise ValueError(f"{file}: not a safetensors file ({e})") from None
                yield name, t
                continue
            t = torch.empty(info["shape"], dtype=stored)
            buf = t.view(-1).view(torch.uint8).numpy() if t.numel() else bytearray()
            f.seek(base + start)
            if f.readinto(buf) != end - start or len(buf) != end - start:
                raise ValueError(f"{file}: tensor {name} is truncated")
            yield name, t


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        return sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
    raise FileNotFoundError(f"{path}: no model.safetensors (or shards) found")


def _tensors(files: list[Path], allow_pickle: bool, map_dtype: torch.dtype | None = None):
    for file in files:
        if file.suffix == ".safetensors":
            yield from ((file, k, t) for k, t in _read_safetensors(file, map_dtype))
        elif not allow_pickle:
            raise ValueError(f"{file}: pickle checkpoints can run code when loaded; convert to safetensors "
                             "or pass allow_pickle=True (loads with torch.load(weights_only=True))")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            yield from ((file, k, t) for k, t in state.items())


def load_model(path_or_preset: str | os.PathLike, dtype: torch.dtype | str = torch.float32, device="cpu",
               allow_pickle: bool = False, mmap: bool = True) -> Apertus:
    """An Apertus model from a Hugging Face checkpoint (a directory or a hub id `org/name[@revision]`), or a freshly
    initialised preset (`tiny`, ...).

    mmap=False copies every tensor into private memory instead of mapping the file. Mapped pages are the page cache's:
    the kernel can drop them under memory pressure, though while a kept tensor holds the mapping, every page read
    counts in the process's RSS (quantizing reads all weights and keeps the embedding)."""
    dtype = parse_dtype(dtype)
    path = resolve_checkpoint_dir(path_or_preset, allow_preset=True)
    if not path.exists() and str(path_or_preset) in PRESETS:
        return build_model(preset(str(path_or_preset)), device=device, dtype=dtype)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a checkpoint directory or a preset ({', '.join(PRESETS)})")
    cfg = load_config(path)
    with torch.device("meta"):
        model = Apertus(cfg)
    expected = {k: v for k, v in model.state_dict().items()}
    loaded, unexpected = set(), []
    for file, key, tensor in _tensors(weight_files(path), allow_pickle, dtype if mmap else None):
        if key not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{file}: tensor {key} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(expected[key].shape)} from config.json")
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        model.load_state_dict({key: tensor.to(device)}, strict=False, assign=True)
        loaded.add(key)
    missing = [k for k in expected if k not in loaded and not k.endswith(OPTIONAL_KEYS)]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match config.json: "
                         f"missing {_short(missing)}; unexpected {_short(unexpected)}")
    for module in model.modules():  # fixed xIELU buffers the file did not carry
        if hasattr(module, "beta") and module.beta.is_meta:
            module.beta = torch.tensor(0.5, dtype=dtype, device=device)
            module.eps = torch.tensor(-1e-6, dtype=dtype, device=device)
    return model.eval()


def _short(keys: list[str], n: int = 8) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


# --- writing ---------------------------------------------------------------------------------------------------------


def generation_config(cfg: ApertusConfig, instruct: bool = False) -> dict:
    """Stop ids and the Apertus sampling recommendation (temperature 0.8, top_p 0.9)."""
    eos = INSTRUCT_STOP_IDS if instruct else cfg.eos_token_id
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id,
            "do_sample": True, "temperature": 0.8, "top_p": 0.9}


def save_model(model: Apertus, path: str | os.PathLike, dtype: torch.dtype | str | None = None,
               max_shard_bytes: int = 5 * 2**30, instruct: bool = False, extra_files: dict[str, str] | None = None):
    """Write a Hugging Face checkpoint directory atomically (a temporary sibling, then rename).

    `extra_files` maps file names to text (tokenizer files, chat template, cards) written in the same directory.
    """
    dtype = parse_dtype(dtype) or model.lm_head.weight.dtype
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
             for k, v in model.state_dict().items()}
    shards, current, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], tmp / "model.safetensors", metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / name, metadata=meta)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_json(tmp / "model.safetensors.index.json", index, indent=2)
    atomic_write_json(tmp / "config.json", model.config.to_hf_dict(DTYPE_NAMES[dtype]), indent=2)
    atomic_write_json(tmp / "generation_config.json", generation_config(model.config, instruct), indent=2)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    replace_dir(tmp, path)


def replace_dir(tmp: Path, path: Path):
    """Swap a fully written directory into place; the old one is removed only after the new one is there."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)

