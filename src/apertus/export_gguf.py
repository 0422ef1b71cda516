"""GGUF export for llama.cpp (architecture `apertus`, llama.cpp b6671+).

The file is what llama.cpp's own converter (`convert_hf_to_gguf.py`, `ApertusModel(LlamaModel)`) writes for the same
checkpoint, so llama.cpp, Ollama and LM Studio load it unchanged:
- tensors under the gguf-py names of MODEL_ARCH.APERTUS; Q/K are NOT permuted (Apertus is NEOX-style RoPE, the HF
  half-rotation layout is what llama.cpp expects); norms and other 1-D tensors stay F32, matrices take `dtype`;
- the per-layer xIELU scalars as metadata arrays `xielu.alpha_p/alpha_n/beta/eps` holding the RAW parameters (llama.cpp
  applies softplus itself: alpha_p = softplus(a_p), alpha_n = beta + softplus(a_n));
- llama3 NTK-by-parts RoPE scaling as a `rope_freqs` tensor of per-dimension divisors (theta_i / factor_i);
- the byte-level BPE vocabulary as tokenizer model "gpt2" with pre-tokenizer "tekken" (Apertus' regex is Mistral
  Nemo's), token types CONTROL for special added tokens and USER_DEFINED for the others, merges, special ids,
  add_bos and the chat template (the last three via gguf-py's SpecialVocab, the converter's own reader).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import load_model
from .config import ApertusConfig, load_config

FILE_TYPES = {"f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
              "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
              "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16)}
# Apertus/tekken pre-tokenizer split (tokenizer.json); llama.cpp implements it as pre-tokenizer type "tekken".
TEKKEN_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
                r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# --quant: q8_0 is quantized here by gguf-py (as llama.cpp's converter does with --outtype q8_0); the others are
# llama.cpp's own quantizer (llama-cpp-python), which picks each tensor's type (K-quant mixtures: Q6_K output, ...).
GGUF_QUANTS = ("q8_0",)
LLAMA_CPP_QUANTS = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s",
                    "q5_k_m", "q6_k")
QUANTS = GGUF_QUANTS + LLAMA_CPP_QUANTS
XIELU_KEYS = {"alpha_p": gguf.Keys.xIELU.ALPHA_P, "alpha_n": gguf.Keys.xIELU.ALPHA_N,
              "beta": gguf.Keys.xIELU.BETA, "eps": gguf.Keys.xIELU.EPS}


def export_gguf(hf_dir: str | os.PathLike, out_file: str | os.PathLike, dtype: str = "f32",
                quant: str | None = None) -> Path:
    """Write the HF Apertus checkpoint `hf_dir` (with its tokenizer.json) as one GGUF file; returns its path.

    `dtype` is the type of the weight matrices: "f32" (exact), "bf16" (exact for bf16 checkpoints) or "f16".
    `quant` quantizes them instead: "q8_0" here (rows whose length is not a multiple of 32 stay F16, as in llama.cpp's
    converter); "q4_k_m" and the other LLAMA_CPP_QUANTS through llama.cpp's quantizer (llama-cpp-python), from a
    temporary `dtype` GGUF.
    The file is written to a temporary sibling and renamed into place, so an existing `out_file` survives a failure.
    """
    if dtype not in FILE_TYPES:
        raise ValueError(f"GGUF dtype {dtype!r} is not supported; use one of {', '.join(FILE_TYPES)}")
    if quant is not None and quant not in QUANTS:
        raise ValueError(f"GGUF quantization {quant!r} is not supported; use one of {', '.join(QUANTS)}")
    hf_dir, out_file = Path(hf_dir), Path(out_file)
    if out_file.is_dir():
        raise ValueError(f"{out_file}: is a directory; give the .gguf file to write")
    if quant in LLAMA_CPP_QUANTS:
        return _llama_cpp_quantize(hf_dir, out_file, dtype, quant)
    cfg = load_config(hf_dir)
    if not (hf_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{hf_dir}: no tokenizer.json (llama.cpp needs the vocabulary inside the GGUF)")
    tokens, toktypes = _vocab(hf_dir / "tokenizer.json", cfg.vocab_size)
    file_type, matrix_type = FILE_TYPES[dtype]
    if quant == "q8_0":
        file_type, matrix_type = gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0
    # bf16 checkpoints exported as bf16 load as bf16 (half the memory, same bits); everything else goes through fp32.
    stored = json.loads((hf_dir / "config.json").read_text())
    stored = stored.get("torch_dtype", stored.get("dtype"))
    model = load_model(hf_dir, torch.bfloat16 if dtype == "bf16" and stored == "bfloat16" else torch.float32)

    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.APERTUS])
    tensors = _tensors(model, cfg, w)
    for name, t in tensors:
        qtype = _tensor_type(name, t, matrix_type)
        nbytes = math.prod(gguf.quant_shape_to_byte_shape(tuple(t.shape), qtype))
        w.add_tensor_info(name, tuple(t.shape), np.dtype(np.float32), nbytes, raw_dtype=qtype)

    w.add_type(gguf.GGUFType.MODEL)
    total, shared, expert, n_expert = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, hf_dir, None, total)  # name/license from a model card, sampling from gen config
    meta.name = meta.name or hf_dir.resolve().name
    meta.size_label = meta.size_label or gguf.size_label(total, shared, expert, n_expert)
    meta.set_gguf_meta_model(w)
    _hparams(w, cfg, file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(w, hf_dir, tokens, toktypes)

    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        total_bytes = sum(ti.nbytes for shard in w.tensors for ti in shard.values())
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"GGUF {out_file.name}") as bar:
            for name, t in tensors:  # converted one at a time: memory stays at the model plus one tensor
                data = gguf.quants.quantize(t.detach().float().numpy(), _tensor_type(name, t, matrix_type))
                w.write_tensor_data(data)
                bar.update(data.nbytes)
        w.close()
        os.replace(tmp, out_file)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_file


def _tensor_type(name: str, t: torch.Tensor, matrix_type: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    # As the converter: 1-D tensors, norms and non-weights (biases) stay F32; llama.cpp kernels expect that.
    if t.dim() <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[matrix_type]
    if t.shape[-1] % block:  # rows that do not fill whole blocks: F16, as the converter falls back
        return gguf.GGMLQuantizationType.F16
    return matrix_type


def _llama_cpp_quantize(hf_dir: Path, out_file: Path, dtype: str, quant: str) -> Path:
    """A `dtype` GGUF written to a temporary file, then quantized by llama.cpp (`llama_model_quantize`, what the
    `llama-quantize` tool runs) into a temporary sibling of `out_file`, renamed into place."""
    try:
        import llama_cpp
    except ImportError:
        raise ValueError(f"GGUF quantization {quant} needs llama.cpp's quantizer: pip install 'apertus[llama]' (or "
                         "pip install llama-cpp-python; it compiles llama.cpp, ~10 minutes), or use --quant q8_0, "
                         "which needs nothing more") from None
    import ctypes
    import tempfile

    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    with tempfile.TemporaryDirectory(dir=out_file.parent, prefix=".quantize-") as work:
        src = export_gguf(hf_dir, Path(work) / out_file.name, dtype)
        llama_cpp.llama_backend_init()  # as the llama-quantize tool does first (idempotent)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
        try:
            if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
                raise ValueError(f"llama.cpp could not quantize {src.name} to {quant} (its log above says why)")
            os.replace(tmp, out_file)
        finally:
            tmp.unlink(missing_ok=True)
    return out_file


def _tensors(model, cfg: ApertusConfig, w: gguf.GGUFWriter) -> list[tuple[str, torch.Tensor]]:
    """(gguf name, tensor) in writing order; the xIELU scalars go to `w` as metadata instead."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.APERTUS, cfg.num_hidden_layers)
    out, xielu = [], {k: [] for k in XIELU_KEYS}
    if cfg.rope_scaling is not None:
        out.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(cfg)))
    for name, t in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module.endswith(".act_fn"):  # model.layers.{i}.mlp.act_fn.{alpha_p,...}, in layer order
            xielu[leaf].append(float(t.float().reshape(-1)[0]))
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"no GGUF name for checkpoint tensor {name!r}")
        out.append((new, t))
    for leaf, key in XIELU_KEYS.items():
        w.add_array(key, xielu[leaf])
    return out


def llama3_rope_factors(cfg: ApertusConfig) -> torch.Tensor:
    """Per-frequency divisors for llama3 NTK-by-parts scaling (llama.cpp uses theta_i / factor_i)."""
    s, dim = cfg.rope_scaling, cfg.head_dim
    factor, lo, hi = s.get("factor", 8.0), s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old = s.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factors = []
    for wavelen in (2 * math.pi / freqs).tolist():
        if wavelen < old / hi:  # high frequencies: unchanged
            factors.append(1.0)
        elif wavelen > old / lo:  # low frequencies: interpolated by the full factor
            factors.append(factor)
        else:  # in between: blend
            smooth = (old / wavelen - lo) / (hi - lo)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _hparams(w: gguf.GGUFWriter, cfg: ApertusConfig, file_type: gguf.LlamaFileType):
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)  # llama3 scaling travels as the rope_freqs tensor, no scaling type key
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_file_type(file_type)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)


def _vocab(tokenizer_file: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types for ids 0..vocab_size-1, as the converter derives them for a GPT-2-style BPE."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"{tokenizer_file}: not a byte-level BPE tokenizer (model {model.get('type')!r}); "
                         "llama.cpp's Apertus vocabulary is GPT-2 style BPE")
    if not _is_tekken(spec):
        raise ValueError(f"{tokenizer_file}: pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]} (BPE "
                         f"ignore_merges={model.get('ignore_merges')}) is not Apertus' (tekken: its Split regex, then "
                         "ByteLevel; ignore_merges=true); llama.cpp would tokenize text differently")
    tok = Tokenizer.from_file(str(tokenizer_file))
    if tok.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise ValueError(f"{tokenizer_file}: {tok.get_vocab_size(with_added_tokens=True)} tokens do not fit the "
                         f"model's vocab_size {vocab_size}")
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        text = tok.id_to_token(i)
        if text is None:  # embedding rows beyond the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            a = added[i]
            if not a.normalized:  # llama.cpp expects added tokens in their pre-normalised form
                text = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            if a.special or _looks_special(text):
                types.append(gguf.TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _looks_special(text: str) -> bool:
    # The converter's heuristic for added tokens left non-special by their tokenizer.
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _is_tekken(spec: dict) -> bool:
    """Whether tokenizer.json tokenizes as Apertus (= Mistral Nemo "tekken") does, which is all llama.cpp's
    pre-tokenizer type "tekken" implements (it also forces ignore_merges)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if spec.get("normalizer") is not None or len(steps) != 2 or not spec["model"].get("ignore_merges"):
        return False
    split, byte_level = steps
    return (split.get("type") == "Split" and split.get("pattern", {}).get("Regex") == TEKKEN_REGEX
            and split.get("behavior") == "Isolated" and not split.get("invert")
            and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space", False))


def _tokenizer(w: gguf.GGUFWriter, hf_dir: Path, tokens: list[str], toktypes: list[int]):
    tok_cfg = hf_dir / "tokenizer_config.json"
    if tok_cfg.is_file():
        add_prefix_space = json.loads(tok_cfg.read_text(encoding="utf-8")).get("add_prefix_space")
        if add_prefix_space is not None:
            w.add_add_space_prefix(add_prefix_space)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("tekken")
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    # merges, bos/eos/unk/pad ids (tokenizer_config.json first, then config.json), add_bos from the post-processor,
    # chat template (tokenizer_config.json or chat_template.jinja): the same reader the converter uses.
    log = logging.getLogger("gguf.vocab")  # its notes on the <s> A <s> B pair template only confuse users
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        gguf.SpecialVocab(hf_dir, load_merges=True).add_to_gguf(w, quiet=True)
    finally:
        log.setLevel(level)
