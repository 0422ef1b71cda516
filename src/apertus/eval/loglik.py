"""Log-likelihoods from the network, batched, each shared context computed once.

A request is (context ids, continuation ids); its score is log P(continuation | context) summed over the
continuation's tokens, plus whether greedy decoding would have produced the continuation (lm-eval's `is_greedy`).

Requests with the same context (the choices of a multiple-choice question) become one row of the batch laid out as
a tree: `context + choice_1[:-1] + choice_2[:-1] + ...`. Each choice's tokens carry the positions that follow the
context and attend to the context and to themselves only (a boolean attention mask), so the context is encoded once
for all its choices and no token is computed twice. The last token of a choice is only a target, never an input.
Rows are sorted by length and batched under a token budget, so padding is small; the logits are computed only at the
positions that predict a continuation token (never a full (B, T, vocab) tensor).

Text is tokenized the way lm-evaluation-harness does it: trailing spaces of the context move to the continuation,
context + continuation is encoded as one string and split at the context's token count; every context starts with
`<s>` (documents are trained as `<s>` + text).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..tokenizer import Tokenizer, apertus_tokenizer_path

APERTUS_VOCAB = 131072


def load_tokenizer(model_dir: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
                   vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint: `tokenizer` if given, else DIR/tokenizer.json, else the released Apertus
    tokenizer when the model has its vocabulary (131,072 ids)."""
    if tokenizer is not None:
        tok = Tokenizer.from_file(tokenizer)
    elif model_dir is not None and (Path(model_dir) / "tokenizer.json").exists():
        tok = Tokenizer.from_file(model_dir)
    elif vocab_size == APERTUS_VOCAB:
        tok = Tokenizer.from_file(apertus_tokenizer_path())
    else:
        raise FileNotFoundError(f"{model_dir}: no tokenizer.json in the checkpoint and the model's vocabulary "
                                f"({vocab_size}) is not Apertus's; pass --tokenizer")
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids, more than the model's {vocab_size}")
    if tok.bos_id is None:
        raise ValueError("the tokenizer has no <s> token: documents are scored as <s> + text")
    return tok


class Scorer:
    """A model and its tokenizer, scoring text. `model` needs `hidden_states(ids, position_ids, attn_mask)` and
    `lm_head` (an `apertus.model.Apertus`)."""

    def __init__(self, model, tokenizer: Tokenizer, max_len: int = 4096, batch_tokens: int = 8192,
                 progress: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.max_len = min(max_len, model.config.max_position_embeddings)
        self.batch_tokens, self.progress = batch_tokens, progress
        self.bos_id, self.eos_id = tokenizer.bos_id, tokenizer.eos_id

    @classmethod
    def from_pretrained(cls, path, dtype="fp32", device=None, tokenizer=None, **kwargs) -> Scorer:
        from ..checkpoint import load_model, resolve_checkpoint_dir

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = resolve_checkpoint_dir(path, allow_preset=True)  # a hub id: its local snapshot (tokenizer included)
        model = load_model(path, dtype=dtype, device=device)
        return cls(model, load_tokenizer(path, tokenizer, model.config.vocab_size), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.encode_batch(list(texts), bos=False)

    def pair_ids(self, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """(context, continuation) strings to token ids, split as lm-evaluation-harness splits them."""
        moved = []
        for ctx, cont in pairs:
            n = len(ctx) - len(ctx.rstrip())
            moved.append((ctx[:len(ctx) - n], ctx[len(ctx) - n:] + cont))
        ctx_ids = self.encode([c for c, _ in moved])
        whole_ids = self.encode([c + x for c, x in moved])
        out = []
        for (ctx, cont), c, w in zip(moved, ctx_ids, whole_ids, strict=True):
            if not cont:
                raise ValueError(f"empty continuation for context {ctx[-60:]!r}")
            bos = [] if c[:1] == [self.bos_id] else [self.bos_id]  # a chat-formatted context starts with <s>
            out.append((bos + c, w[len(c):]))
        return out

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        return score_requests(self.model, self.pair_ids(pairs), self.max_len, self.batch_tokens, self.progress)

    def rolling_nll(self, texts: list[str], stride: int | None = None) -> list[tuple[float, int]]:
        """(NLL in nats, number of predicted tokens) of each whole text after `<s>`, in windows of `max_len`
        tokens that advance by `stride` (default: `max_len`, the harness's disjoint windows)."""
        requests, owner = [], []
        for i, ids in enumerate(self.encode(texts)):
            windows = rolling_windows([self.bos_id] + ids, self.max_len, stride)
            requests += windows
            owner += [i] * len(windows)
        scores = score_requests(self.model, requests, self.max_len, self.batch_tokens, self.progress)
        nll, count = [0.0] * len(texts), [0] * len(texts)
        for i, (ll, _), (_, cont) in zip(owner, scores, requests, strict=True):
            nll[i] -= ll
            count[i] += len(cont)
        return list(zip(nll, count, strict=True))


def rolling_windows(tokens: list[int], max_len: int, stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Requests that predict tokens[1:] exactly once each: chunks of `stride` tokens, each with as much preceding
    context as fits in `max_len` inputs. stride = max_len gives lm-eval's disjoint windows (context of 1 token)."""
    stride = min(stride or max_len, max_len)
    out = []
    for s in range(1, len(tokens), stride):
        e = min(s + stride, len(tokens))
        out.append((tokens[max(0, e - 1 - max_len):s], tokens[s:e]))
    return out


def _segments(requests, max_len):
    """Group requests by context into rows (ctx, [(index, cont), ...]) of at most max_len input tokens."""
    groups: dict[tuple, list] = {}
    for i, (ctx, cont) in enumerate(requests):
        if not ctx:
            raise ValueError(f"request {i}: empty context (start it with <s>)")
        if not cont:
            raise ValueError(f"request {i}: empty continuation")
        if len(cont) > max_len:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_len {max_len}")
        ctx = ctx[-(max_len + 1 - len(cont)):]  # truncate on the left, as the harness does
        groups.setdefault(tuple(ctx), []).append((i, list(cont)))
    rows = []
    for ctx, branches in groups.items():
        cur, length = [], len(ctx)
        for i, cont in branches:
            if cur and length + len(cont) - 1 > max_len:
                rows.append((ctx, cur))
                cur, length = [], len(ctx)
            cur.append((i, cont))
            length += len(cont) - 1
        rows.append((ctx, cur))
    return rows


def _layout(ctx, branches):
    """Input ids, position ids and branch ids (0 = context) of one tree row, and for each request the row indices
    whose outputs predict its tokens."""
    ids, pos, branch = list(ctx), list(range(len(ctx))), [0] * len(ctx)
    predict = []
    for b, (_, cont) in enumerate(branches, 1):
        start = len(ids)
        ids += cont[:-1]
        pos += range(len(ctx), len(ctx) + len(cont) - 1)
        branch += [b] * (len(cont) - 1)
        predict.append([len(ctx) - 1] + list(range(start, start + len(cont) - 1)))
    return ids, pos, branch, predict


@torch.inference_mode()
def score_requests(model, requests: list[tuple[list[int], list[int]]], max_len: int, batch_tokens: int = 8192,
                   progress: bool = True, chunk: int = 256) -> list[tuple[float, bool]]:
    """(sum of log-probabilities, is_greedy) of each continuation given its context; see the module docstring."""
    device = model.lm_head.weight.device
    rows = sorted(_segments(requests, max_len), key=lambda r: -(len(r[0]) + sum(len(c) - 1 for _, c in r[1])))
    out: list = [None] * len(requests)
    bar = tqdm(total=sum(len(c) for _, c in requests), unit="tok", desc="scoring", disable=not progress,
               mininterval=2.0)
    i = 0
    while i < len(rows):
        layouts = [_layout(*rows[i])]
        T = len(layouts[0][0])
        while i + len(layouts) < len(rows) and (len(layouts) + 1) * T <= batch_tokens:
            layouts.append(_layout(*rows[i + len(layouts)]))
        batch_rows, i = rows[i:i + len(layouts)], i + len(layouts)
        B = len(layouts)
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        branch = torch.full((B, T), -1, dtype=torch.long)  # -1 = padding
        for r, (x, p, b, _) in enumerate(layouts):
            ids[r, :len(x)], pos[r, :len(x)], branch[r, :len(x)] = torch.tensor(x), torch.tensor(p), torch.tensor(b)
        mask = None
        if any(len(br) > 1 for _, br in batch_rows):
            # causal, and a choice's tokens see the context (branch 0) and their own branch only; padding sees itself
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            same = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
            mask = (causal & same & (branch[:, None, :] >= 0)) | torch.eye(T, dtype=torch.bool)
            mask = mask[:, None].to(device)
        # with one branch per row, right padding cannot reach a real token through the causal mask
        h = model.hidden_states(ids.to(device), pos.to(device), mask)
        where_r, where_t, targets, owners = [], [], [], []
        for r, ((_, branches), (_, _, _, predict)) in enumerate(zip(batch_rows, layouts, strict=True)):
            for (req, cont), idx in zip(branches, predict, strict=True):
                where_r += [r] * len(idx)
                where_t += idx
                targets += cont
                owners.append((req, len(cont)))
        sel = h[torch.tensor(where_r, device=device), torch.tensor(where_t, device=device)]
        targets = torch.tensor(targets, device=device)
        lp, greedy = [], []
        for s in range(0, len(targets), chunk):
            logp = torch.log_softmax(model.lm_head(sel[s:s + chunk]).float(), dim=-1)
            t = targets[s:s + chunk]
            lp.append(logp.gather(1, t[:, None])[:, 0])
            greedy.append(logp.argmax(-1) == t)
        lp, greedy = torch.cat(lp).double().cpu(), torch.cat(greedy).cpu()
        k = 0
        for req, n in owners:
            out[req] = (lp[k:k + n].sum().item(), bool(greedy[k:k + n].all()))
            k += n
        bar.update(len(targets))
    bar.close()
    return out
