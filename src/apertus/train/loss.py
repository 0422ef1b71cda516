"""Training losses: the Goldfish mask as Apertus ran it (SPEC §3) and a chunked, masked cross-entropy.

`linear_cross_entropy` takes the final hidden states and the lm_head weight instead of logits: it walks the rows in
chunks, so the (tokens × vocabulary) logits of a long row never all exist at once, and it computes the gradients of
each chunk while its logits are at hand (no second pass over the vocabulary in backward).
"""

from __future__ import annotations

import functools

import torch

GOLDFISH_TABLE_SIZE = 1_000_003
GOLDFISH_SEED = 2971215073


@functools.cache
def _goldfish_table(device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(GOLDFISH_SEED)  # the CPU generator, as in Megatron's dataset code
    return torch.rand(GOLDFISH_TABLE_SIZE, generator=g).to(device)


def goldfish_mask(labels: torch.Tensor, k: int = 50, h: int = 50) -> torch.Tensor:
    """True where a label counts in the loss; False for the ≈1/k of tokens Goldfish drops.

    A token is dropped when table[key] < 1/k, key = int64 product (wrapping) of the h labels ending at it, modulo
    the table size; the first h−1 positions of each row are never dropped. Works on (T,) or (B, T) labels.
    """
    keep = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    if not k or labels.shape[-1] < h:
        return keep
    keys = labels.long().unfold(-1, h, 1).prod(dim=-1) % GOLDFISH_TABLE_SIZE
    drop = _goldfish_table(str(labels.device))[keys] < 1 / k
    keep[..., h - 1:] = ~drop
    return keep


def default_chunk_rows(vocab_size: int) -> int:
    """~1 GB of fp32 logits per chunk (2,048 rows of a 131k vocabulary): few chunks, because every chunk after the
    first adds its product to the fp32 weight gradient, a pass over all of it (~57 ms at 131k × 768 on 2 cores)."""
    return max(64, 2**28 // vocab_size)


def _xent(h, w, labels, weights, need_grad: bool):
    """Σ weights · cross-entropy of the logits h·Wᵀ of one chunk of rows (log-softmax in fp32) and, when asked, its
    gradient w.r.t. the logits in h's dtype: dCE/dlogits = softmax − onehot, times the token's weight."""
    if torch.compiler.is_compiling():
        # written for inductor, which makes it one kernel: per row the maximum, then exp(x − max) once into a row
        # buffer that the sum and the gradient both read (logsumexp, then the softmax, took two exps per logit: the
        # loss with its matmuls was 2-4% slower); the one-hot as a comparison with the column index
        x = h @ w.T
        top = x.amax(-1).float()
        e = torch.exp(x.float() - top[:, None])
        total = e.sum(-1)
        loss = ((top + total.log() - x.gather(1, labels[:, None]).squeeze(1).float()) * weights).sum()
        if not need_grad:
            return loss, None
        hot = torch.arange(x.shape[1], device=x.device) == labels[:, None]
        return loss, ((e / total[:, None] - hot.float()) * weights[:, None]).to(h.dtype)
    x = (h @ w.T).float()
    lse = torch.logsumexp(x, dim=-1)
    loss = ((lse - x.gather(1, labels[:, None]).squeeze(1)) * weights).sum()
    if not need_grad:
        return loss, None
    g = x.sub_(lse[:, None]).exp_()  # eager: in place, no temporary beyond the fp32 logits
    g.scatter_add_(1, labels[:, None], torch.full_like(weights, -1.0)[:, None])
    return loss, g.mul_(weights[:, None]).to(h.dtype)


# The same function compiled by inductor: one fused kernel over the chunk's logits, where eager PyTorch makes six
# passes over them in fp32. Compiled on first use (a few seconds), for static shapes:
# a ragged last chunk gets its own graph, where a dynamic-shape one ran ~5x slower on CPU.
_xent_compiled = torch.compile(_xent, dynamic=False)


def _chunked_ce(h, w, labels, weights, chunk, need_h, need_w, compile=False):
    """Loss sum, and (when asked) the gradients of h and W, one chunk of rows at a time."""
    xent = _xent_compiled if compile else _xent
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = None  # fp32: the first chunk's product converted, the others added to it
    for s in range(0, h.shape[0], chunk):
        hc = h[s:s + chunk]
        chunk_loss, g = xent(hc, w, labels[s:s + chunk], weights[s:s + chunk], need_h or need_w)
        loss += chunk_loss
        if need_h:
            torch.mm(g, w, out=grad_h[s:s + chunk])
        if need_w:
            grad_w = (g.T @ hc).float() if grad_w is None else grad_w.add_(g.T @ hc)
    if need_w and grad_w is None:  # no rows
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    return loss, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ_i w_i · CE(h_i·Wᵀ, y_i); the gradients are computed in forward and only scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, weights, chunk, dtype, compile):
        with torch.autocast(hidden.device.type, enabled=False):
            loss, grad_h, grad_w = _chunked_ce(hidden.to(dtype), weight.to(dtype), labels, weights, chunk,
                                               hidden.requires_grad, weight.requires_grad, compile)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors  # used once (no double backward): scaled in place
        dh = grad_h.mul_(grad_out).to(ctx.dtypes[0]) if grad_h is not None else None
        dw = grad_w.mul_(grad_out).to(ctx.dtypes[1]) if grad_w is not None else None
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         mask: torch.Tensor | None = None, chunk_rows: int | None = None,
                         compile: bool = False) -> torch.Tensor:
    """Sum over tokens of mask · cross-entropy(hidden @ weightᵀ, labels), in fp32 (a scalar tensor).

    hidden (..., d), weight (V, d), labels and mask (...). Labels < 0 count as masked. The matmuls run in the
    autocast dtype when autocast is on (else in hidden's dtype); log-softmax is in fp32. `compile` runs each chunk's
    softmax and gradient through inductor (fused passes over the logits; a one-off compile of a few seconds).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    weights = torch.ones_like(labels, dtype=torch.float32) if mask is None else mask.reshape(-1).float()
    weights = torch.where(labels >= 0, weights, 0.0)
    labels = labels.clamp_min(0)
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    chunk = chunk_rows or default_chunk_rows(weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, weights, chunk, dtype, compile)
    with torch.autocast(dev, enabled=False):
        return _chunked_ce(hidden.to(dtype), weight.to(dtype), labels, weights, chunk, False, False, compile)[0]


@torch.no_grad()
def token_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        chunk_rows: int | None = None) -> torch.Tensor:
    """Per-token cross-entropy (fp32, labels' shape) without gradients, chunked like `linear_cross_entropy`."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).clamp_min(0)
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    chunk = chunk_rows or default_chunk_rows(weight.shape[0])
    out = torch.empty(y.shape, dtype=torch.float32, device=h.device)
    with torch.autocast(dev, enabled=False):
        w = weight.to(dtype)
        for s in range(0, h.shape[0], chunk):
            logits = (h[s:s + chunk].to(dtype) @ w.T).float()
            out[s:s + chunk] = torch.logsumexp(logits, -1) - logits.gather(1, y[s:s + chunk, None]).squeeze(1)
    return out.view(labels.shape)


# --- language-model loss of a packed batch (PackedLoader contract, CONTRACTS.md) ------------------------------------


def lm_loss(model, batch: dict, goldfish: tuple[int, int] | None = (50, 50), document_masking: bool = True,
            chunk_rows: int | None = None, compile: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ masked cross-entropy, number of counted tokens) of one micro-batch.

    Counted tokens: `loss_mask` (EoD inputs and padding excluded) AND the Goldfish mask of the labels. With
    document masking, attention stays inside each packed document and positions restart per document (Megatron
    --reset-attention-mask --reset-position-ids); without it (the 64k stage), rows are plain causal sequences.
    """
    from ..model import document_mask

    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch["loss_mask"]
    if goldfish:
        mask = mask & goldfish_mask(labels, *goldfish)
    if document_masking:
        pos = batch["position_ids"]
        hidden = model.hidden_states(ids, position_ids=pos, attn_mask=document_mask(pos))
    else:
        hidden = model.hidden_states(ids)
    return linear_cross_entropy(hidden, model.lm_head.weight, labels, mask, chunk_rows, compile), mask.sum()


# --- bits per byte ----------------------------------------------------------------------------------------------------


def token_byte_lengths(tokenizer_json: str, vocab_size: int | None = None) -> torch.Tensor:
    """UTF-8 bytes of each token id of a byte-level BPE tokenizer.json; 0 for special tokens (not text).

    Vocabulary pieces are written one character per byte (the GPT-2 byte-to-unicode map); added tokens hold raw text.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    n = vocab_size or tok.get_vocab_size()
    out = torch.zeros(n, dtype=torch.long)
    ids, lengths = [], []
    for piece, i in tok.get_vocab(with_added_tokens=False).items():
        if i < n:
            ids.append(i)
            lengths.append(len(piece))
    out[ids] = torch.tensor(lengths)
    for i, t in tok.get_added_tokens_decoder().items():
        if i < n:
            out[i] = 0 if t.special else len(t.content.encode())
    return out
