"""Model configuration: one dataclass whose fields map 1:1 to a Hugging Face `config.json` of `model_type: apertus`.

Presets carry the real shapes of Apertus-8B/70B (docs/recipe.md §1.1) and a tiny one for CPU demos and tests. Run
recipes (data, training) are TOML files whose `[model]` table is this dataclass; `load_toml` is the one loader for them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Released Apertus-2509 RoPE: θ 12M with llama3 NTK-by-parts scaling (docs/recipe.md §1.1).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
INIT_STD = 0.008944  # Megatron --init-method-std of both Apertus runs


def data_root() -> Path:
    """Where corpora are read from: $APERTUS_DATA, else the user cache holding the embedded corpora (unpacked on first
    use) and whatever `apertus data fetch` added (apertus.embedded)."""
    from .embedded import data_root as root

    return root()


@dataclass
class ApertusConfig:
    vocab_size: int = 131072
    hidden_size: int = 4096
    intermediate_size: int = 21504  # 5.25·d; transformers' default 14336 is a Llama leftover
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 65536
    rms_norm_eps: float = 1e-5
    rope_theta: float = 12_000_000.0
    rope_scaling: dict | None = field(default_factory=lambda: dict(LLAMA3_ROPE))  # None = plain RoPE
    hidden_act: str = "xielu"
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = INIT_STD
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2
    pad_token_id: int = 3

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        checks = [
            (self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
             f"must be a multiple of num_key_value_heads ({self.num_key_value_heads})"),
            (self.head_dim % 2 == 0, "head_dim", "must be even for RoPE"),
            (self.hidden_act == "xielu", "hidden_act", "only 'xielu' is an Apertus activation"),
            (not self.tie_word_embeddings, "tie_word_embeddings", "Apertus has untied embeddings"),
        ]
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            checks.append((getattr(self, name) > 0, name, "must be positive"))
        for ok, key, why in checks:
            if not ok:
                raise ValueError(f"model config: {key} = {getattr(self, key)!r} {why}")
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            rope_type = scaling.pop("rope_type", scaling.pop("type", None))
            scaling.pop("rope_theta", None)  # the 5.x spelling carries θ inside; the field rope_theta holds it
            if rope_type == "default":
                self.rope_scaling = None
            elif rope_type != "llama3":
                raise ValueError(f"model config: rope_scaling type {rope_type!r} is not supported (llama3 or none)")
            else:
                self.rope_scaling = {"rope_type": "llama3", **scaling}

    # --- Hugging Face config.json -------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ApertusConfig:
        """Read a transformers config dict, 4.x spelling (rope_theta + rope_scaling) or 5.x (rope_parameters).

        A config with neither RoPE key (what this package wrote for plain RoPE before it named RoPE explicitly)
        or with `rope_scaling: null` (4.x's plain RoPE) reads as plain RoPE. When both spellings are present they
        must agree: transformers 5 reads `rope_scaling` first and 4.x reads only it, so a mismatch would load
        differently depending on the version.
        """
        if d.get("model_type") != "apertus":
            raise ValueError(f"model_type is {d.get('model_type')!r}, expected 'apertus'")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        new, old = d.get("rope_parameters"), d.get("rope_scaling")
        if new and old and _rope_key(new, d.get("rope_theta")) != _rope_key(old, d.get("rope_theta")):
            raise ValueError(f"rope_parameters {new} and rope_scaling {old} disagree; keep one of them")
        rope = new or old
        if rope:
            rope = dict(rope)
            if "rope_theta" in rope:
                kw["rope_theta"] = rope.pop("rope_theta")
            kw["rope_scaling"] = rope
        else:
            kw["rope_scaling"] = None
        if d.get("post_norm"):
            raise ValueError("post_norm=true Apertus checkpoints are not supported (the released models are pre-norm)")
        return cls(**kw)

    def rope_parameters(self) -> dict[str, Any]:
        """The RoPE as transformers 5.x spells it: rope_type ("default" for plain RoPE), rope_theta, scaling."""
        rope = dict(self.rope_scaling) if self.rope_scaling is not None else {"rope_type": "default"}
        return {**rope, "rope_theta": self.rope_theta}

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """The config.json transformers (4.56+ and 5.x), vLLM and llama.cpp's converter read.

        The RoPE is written out in full in both spellings, `rope_type: "default"` included for plain RoPE: a config
        that leaves it out gets transformers' ApertusConfig default (llama3 scaling, θ 12M) instead. Transformers 5
        reads `rope_scaling` before `rope_parameters`, so both carry the same dict, θ included; 4.56 reads
        `rope_scaling` with the top-level `rope_theta` (and ignores the extra key).
        """
        d = {"architectures": ["ApertusForCausalLM"], "model_type": "apertus"}
        d.update(dataclasses.asdict(self))
        d.pop("mlp_bias")
        d["qk_norm"], d["post_norm"] = self.qk_norm, False
        d["torch_dtype"] = dtype
        d["use_cache"] = True
        d["rope_scaling"] = self.rope_parameters()
        d["rope_parameters"] = self.rope_parameters()
        return d

    # --- derived quantities ---------------------------------------------------------------------------------------

    def num_params(self, embeddings: bool = True) -> int:
        d, f, L, hd = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.head_dim
        attn = d * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads) + 2 * hd
        block = attn + 2 * d * f + 2 + 2 * d  # + xIELU α's + two RMSNorms
        n = L * block + d + self.vocab_size * d  # + final norm + lm_head
        return n + (self.vocab_size * d if embeddings else 0)

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """6·N_matmul + 12·L·H·D·T per trained token (PaLM convention; forward only is a third of it).

        N_matmul excludes the input embedding (a lookup). Without causal halving of attention this reproduces the
        Apertus tech report's App. D figures: 51.6 GFLOP/token (8B) and 449.6 (70B) at T = 4096, within 0.2%.
        """
        attn = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        total = 6 * self.num_params(embeddings=False) + attn
        return total if training else total / 3

    def inv_freq(self) -> torch.Tensor:  # noqa: F821
        """RoPE inverse frequencies, with llama3 NTK-by-parts scaling when configured (float32)."""
        import torch

        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if self.rope_scaling is None:
            return inv
        s = self.rope_scaling
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s.get("original_max_position_embeddings", self.max_position_embeddings)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)  # long wavelengths: interpolate
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, scaled)


def _rope_key(rope: dict, theta: float | None) -> tuple:
    """A RoPE dict reduced to what it means (type, θ, scaling numbers), to compare two spellings."""
    rope = dict(rope)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    theta = rope.pop("rope_theta", theta)
    return rope_type, theta, tuple(sorted(rope.items()))


PRESETS: dict[str, ApertusConfig] = {
    # A few million parameters: the CPU speedrun and the tests. Vocabulary of a tokenizer trained in the speedrun.
    "tiny": ApertusConfig(vocab_size=8192, hidden_size=256, intermediate_size=1344, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536,
                          rope_theta=500_000.0),
    "apertus-8b": ApertusConfig(),
    "apertus-70b": ApertusConfig(hidden_size=8192, intermediate_size=43008, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8),
}


def preset(name: str) -> ApertusConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def load_config(path: str | Path) -> ApertusConfig:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None
    try:
        return ApertusConfig.from_hf_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: {e}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: recipe not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML ({e})") from None


def model_config_from(spec: dict[str, Any] | str) -> ApertusConfig:
    """A `[model]` recipe table: `preset = "tiny"` plus any field overrides; unknown keys are an error."""
    if isinstance(spec, str):
        return preset(spec)
    spec = dict(spec)
    base = preset(spec.pop("preset", "tiny"))
    spec.setdefault("head_dim", None)  # re-derive from hidden_size / heads unless given
    names = {f.name for f in dataclasses.fields(ApertusConfig)}
    unknown = sorted(set(spec) - names)
    if unknown:
        raise ValueError(f"[model]: unknown key(s) {', '.join(unknown)}")
    return dataclasses.replace(base, **spec)
