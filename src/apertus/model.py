"""The Apertus decoder in plain PyTorch (docs/recipe.md §1.1); tensor names are Hugging Face's so checkpoints map 1:1.

    x = embed_tokens(ids)
    per layer:  x = x + o_proj(attention(rope(qk_norm(q)), rope(qk_norm(k)), v))     (pre-norm: attention_layernorm)
                x = x + down_proj(xielu(up_proj(x)))                              (pre-norm: feedforward_layernorm)
    logits = lm_head(norm(x))                                                      (untied)

Parallelism stays out of this file (see train/distributed.py). Two hooks serve the rest of the system:
`attn_mask` (bool, True = may attend) carries document masking for packed rows and the engine's cache layout (without a
cache, attention is causal and a mask can only narrow it), and
`cache.update(layer_idx, k, v) -> (k, v)` lets the inference engine keep keys/values wherever it wants.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ApertusConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference, then scale in the weight's precision.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def _softplus_inv(y: float) -> float:
    return math.log(math.expm1(y))


class XIELU(nn.Module):
    """xIELU (Huang & Schlag 2024) with its two trainable scalars, softplus-parametrised (docs/recipe.md §1.1):
    x > 0:  alpha_p·x² + beta·x        x <= 0:  alpha_n·(expm1(min(x, eps)) − x) + beta·x
    with alpha_p = softplus(a_p), alpha_n = beta + softplus(a_n), beta = 0.5 and eps = −1e-6 fixed buffers.
    """

    def __init__(self, alpha_p_init: float = 0.8, alpha_n_init: float = 0.8, beta: float = 0.5, eps: float = -1e-6):
        super().__init__()
        self.inits = (_softplus_inv(alpha_p_init), _softplus_inv(alpha_n_init - beta))
        self.alpha_p = nn.Parameter(torch.tensor([self.inits[0]]))
        self.alpha_n = nn.Parameter(torch.tensor([self.inits[1]]))
        self.register_buffer("beta", torch.tensor(beta))
        self.register_buffer("eps", torch.tensor(eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha_p = F.softplus(self.alpha_p).to(x.dtype)
        alpha_n = (self.beta + F.softplus(self.alpha_n)).to(x.dtype)
        beta, eps = self.beta.to(x.dtype), self.eps.to(x.dtype)
        negative = alpha_n * (torch.expm1(torch.minimum(x, eps)) - x)
        return torch.where(x > 0, alpha_p * x * x, negative) + beta * x


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape (B, T, head_dim) in the half-rotation layout of the reference (computed in fp32)."""
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Causal mask that keeps attention inside each document of a packed row (a document starts at position 0).

    Returns bool (B, T, T), True where query i may attend key j.
    """
    doc = torch.cumsum(position_ids == 0, dim=-1)
    T = position_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return (doc[:, :, None] == doc[:, None, :]) & causal


def packed_position_ids(doc_starts: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at every True of `doc_starts` (B, T) (the first token always starts one)."""
    T = doc_starts.shape[-1]
    idx = torch.arange(T, device=doc_starts.device).expand_as(doc_starts)
    starts = torch.where(doc_starts, idx, torch.zeros_like(idx))
    return idx - torch.cummax(starts, dim=-1).values


def single_query_attention(q, k, v, attn_mask=None):
    """softmax(q·kᵀ/√D + mask)·v for q (B, H, 1, D) against k, v (B, n_kv, L, D), the query heads of a group sharing
    one key/value head as in SDPA's enable_gqa; mask (B, 1, 1, L), additive or bool (True = may attend).
    Returns (B, 1, H·D), heads concatenated as o_proj reads them."""
    B, H, _, D = q.shape
    n_kv, L = k.shape[1], k.shape[2]
    scores = torch.matmul(q.reshape(B, n_kv, H // n_kv, D), k.transpose(-1, -2)).float() * D**-0.5
    if attn_mask is not None:
        mask = attn_mask.reshape(-1, 1, 1, L)
        scores = scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v).reshape(B, 1, H * D)


def causal_attention(q, k, v, attn_mask=None, block: int = 128):
    """softmax(q·kᵀ/√D + mask)·v of T positions against themselves, written as matmuls for inductor: on CPU it fuses
    the mask and the softmax and runs forward and backward ~2x faster than SDPA's flash kernel at T = 512.

    Causal: each block of `block` queries reads only the keys up to its last position, skipping the ~half of the
    products that a causal mask discards. attn_mask (B, 1, T, T), bool, may narrow attention further (document
    masking); it is only read at or below the diagonal. q (B, H, T, D), k and v (B, n_kv, T, D), the query heads of
    a group sharing one key/value head. Keeps the bf16 probabilities for backward: O(T²) memory, for short rows."""
    B, H, T, D = q.shape
    n_kv = k.shape[1]
    out = []
    for s in range(0, T, block):
        e = min(s + block, T)
        qg = q[:, :, s:e].reshape(B, n_kv, H // n_kv * (e - s), D)
        scores = (qg @ k[:, :, :e].transpose(-1, -2)).float().view(B, n_kv, H // n_kv, e - s, e) * D**-0.5
        if attn_mask is None:
            keep = torch.ones(e - s, e, dtype=torch.bool, device=q.device).tril(s)
        else:
            keep = attn_mask[:, :, None, s:e, :e]
        p = torch.softmax(scores.masked_fill(~keep, -torch.inf), dim=-1).to(v.dtype)
        out.append((p.view(B, n_kv, -1, e) @ v[:, :, :e]).view(B, H, e - s, D))
    return torch.cat(out, dim=2)


class Linear(nn.Linear):
    """nn.Linear, except for one row (decoding a single sequence) on CPU under torch.compile: there the product is
    written as a multiply-and-sum over fp32 values, which inductor turns into one loop bound by reading the weights
    (~40-50 GB/s on 2 cores of an EPYC, where oneDNN's bf16 matrix-vector product reads ~20).
    - The input is materialised first (inductor_force_stride_order); left to itself, inductor would recompute the
      producing ops (the norm, xIELU's expm1) for every row of the weights.
    - Sums longer than 4,096 are split into equal pieces: past that length inductor switches to cascade summation,
      at half the speed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1] or x.device.type != "cpu" or not torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        n, k = self.weight.shape
        x = torch.ops.prims.inductor_force_stride_order(x, x.stride())
        pieces = next(p for p in range(-(-k // 4096), k + 1) if k % p == 0)
        w = self.weight.float()
        if pieces == 1:
            y = (x.reshape(1, k).float() * w).sum(-1)
        else:
            y = (x.reshape(1, pieces, k // pieces).float() * w.view(n, pieces, k // pieces)).sum(-1).sum(-1)
        y = y.to(x.dtype).reshape(*x.shape[:-1], n)
        return y if self.bias is None else y + self.bias


class Attention(nn.Module):
    def __init__(self, cfg: ApertusConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, d, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if T == 1 and x.device.type == "cpu":  # decoding: two small matmuls beat SDPA's CPU kernel (bf16: ~10x)
            return self.o_proj(single_query_attention(q, k, v, attn_mask))
        if cache is None and T <= 1024 and x.device.type == "cpu" and torch.compiler.is_compiling():
            y = causal_attention(q, k, v, attn_mask)  # training on CPU: faster than SDPA's kernel, see there
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        is_causal = False
        if attn_mask is None and T > 1:
            if k.shape[2] == T:
                is_causal = True
            else:  # queries are the last T positions of the keys: bottom-right aligned causal mask
                attn_mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ApertusConfig):
        super().__init__()
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act_fn = XIELU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ApertusConfig, layer_idx: int):
        super().__init__()
        self.attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        x = x + self.self_attn(self.attention_layernorm(x), cos, sin, attn_mask, cache)
        return x + self.mlp(self.feedforward_layernorm(x))


class Decoder(nn.Module):
    """`model.*` of the checkpoint: embeddings, blocks, final norm."""

    def __init__(self, cfg: ApertusConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Apertus(nn.Module):
    def __init__(self, config: ApertusConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        # A plain attribute, not a buffer: RoPE frequencies stay fp32 whatever dtype the model is cast to.
        self._inv_freq: torch.Tensor | None = None

    def inv_freq(self, device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = self.config.inv_freq().to(device)
        return self._inv_freq

    def set_rope(self, theta: float, scaling: dict | None | type(...) = ...) -> None:
        """Change RoPE θ (e.g. at a pretraining stage boundary) and, when given, the llama3 scaling (None removes
        it; left out, it stays). The config changes with it, so a checkpoint saved afterwards carries the new θ."""
        if theta <= 0:
            raise ValueError(f"model: RoPE theta must be positive, got {theta}")
        self.config.rope_theta = float(theta)
        if scaling is not ...:
            self.config.rope_scaling = scaling
        self._inv_freq = None  # recomputed from the config, on the input's device, by the next forward

    def hidden_states(self, input_ids, position_ids=None, attn_mask=None, cache=None) -> torch.Tensor:
        """Final-normed hidden states (B, T, d): what the lm_head reads; training chunks the lm_head over them."""
        x = self.model.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        cos, sin = rope_cos_sin(self.inv_freq(x.device), position_ids.expand(input_ids.shape[0], -1), x.dtype)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask[:, None]
        for layer in self.model.layers:
            x = layer(x, cos, sin, attn_mask, cache)
        return self.model.norm(x)

    def forward(self, input_ids, position_ids=None, attn_mask=None, cache=None) -> torch.Tensor:
        """Logits (B, T, vocab). `position_ids` restarting at 0 mark packed documents; pass
        `attn_mask=document_mask(position_ids)` to keep attention inside them."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, attn_mask, cache))

    # --- initialisation and I/O ---------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """Megatron init of the Apertus runs: N(0, std) everywhere, std/sqrt(2·layers) on the output projections
        of each residual branch (o_proj, down_proj); norms to one; xIELU to its initial alphas."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                s = out_std if name.endswith(("o_proj", "down_proj")) else std
                _normal_(module.weight, s, gen)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, XIELU):
                module.alpha_p.fill_(module.inits[0])
                module.alpha_n.fill_(module.inits[1])
                module.beta.fill_(0.5)
                module.eps.fill_(-1e-6)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _normal_(t: torch.Tensor, std: float, gen: torch.Generator | None):
    if gen is None or t.device.type != "cpu":
        nn.init.normal_(t, 0.0, std)
    else:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(std))


def build_model(config: ApertusConfig, device="cpu", dtype=torch.float32, seed: int | None = 0) -> Apertus:
    """Build and initialise; `device="meta"` builds any size without allocating memory."""
    with torch.device("meta"):
        model = Apertus(config)
    if str(device) == "meta":
        return model
    model.to_empty(device=device)
    model.init_weights(seed)
    return model.to(dtype)
