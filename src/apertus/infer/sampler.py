"""The one sampler of the project (CLI, server, eval, QRPO rollouts): penalties, temperature, top-k, top-p, min-p,
greedy, per-request seeds, log-probabilities.

Semantics follow transformers' logits processors (the reference the tests compare against), applied in their order:
repetition penalty (over prompt + output), then OpenAI presence/frequency penalties (over the output only, as vLLM),
OpenAI logit_bias (added to the logits), the grammar mask of a constrained request (structured.py: tokens the
grammar forbids get -1e30), temperature, top-k, top-p (on the distribution left by top-k), min-p. Reported
log-probabilities are those of the model itself (log-softmax of the raw logits), which is what evaluation and the QRPO
loss need.

Sampling draws ONE uniform number per request and step from that request's own generator and inverts the filtered
CDF, so a seeded request gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

MAX_TOP_LOGPROBS = 20
_CANDIDATES = 256  # top-p is resolved among this many most likely tokens when their mass suffices (else full sort)


@dataclass
class SamplingParams:
    """None means "the checkpoint's default" (generation_config.json, else temperature 0.8 / top_p 0.9, stop on EOS).

    temperature 0 is greedy. max_tokens None runs to the end of the context (or of the cache budget). Stop token ids
    end generation and are kept in the output ids but not in the text; stop strings truncate the text before them.

    logit_bias: {token id: bias in [-100, 100]} added to the logits (OpenAI: +100 forces a token, -100 bans it).
    json_schema (a JSON Schema dict; {"type": "object"} for any object) or grammar (llguidance's Lark syntax, which
    may embed `%json {...}` schemas and special tokens such as `<|tools_suffix|>`): constrained decoding; the output
    follows it and the request ends when it is complete (or at max_tokens). See structured.py.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 256
    stop_token_ids: list[int] | None = None
    stop: list[str] | str | None = None
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = False
    logit_bias: dict[int, float] | None = None
    json_schema: dict | None = None
    grammar: str | None = None
    stop_strings: list[str] = field(init=False, default_factory=list, repr=False)

    def __post_init__(self):
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        checks = [
            ("temperature", self.temperature is None or self.temperature >= 0, "must be >= 0 (0 = greedy)"),
            ("top_p", self.top_p is None or 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k is None or self.top_k >= 0, "must be >= 0 (0 = off)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty is None or self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1"),
            ("top_logprobs", 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"must be in [0, {MAX_TOP_LOGPROBS}]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop_strings), "must be non-empty strings"),
            ("logit_bias", _valid_bias(self.logit_bias), "must map token ids (>= 0) to biases in [-100, 100]"),
            ("grammar", self.json_schema is None or self.grammar is None, "and json_schema: give one of them"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"sampling: {name} = {getattr(self, name)!r} {why}")

    def resolved(self, defaults: dict) -> SamplingParams:
        """A copy with every None that has a default filled in (`defaults` from generation_config.json)."""
        fill = {k: defaults[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty", "stop_token_ids")
                if getattr(self, k) is None and k in defaults}
        return dataclasses.replace(self, **fill)

    @property
    def constrained(self) -> bool:
        return self.json_schema is not None or self.grammar is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty not in (None, 1.0)) or self.presence_penalty != 0 or self.frequency_penalty != 0


def _valid_bias(bias) -> bool:
    if bias is None:
        return True
    return isinstance(bias, dict) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 and isinstance(b, (int, float))
        and not isinstance(b, bool) and -100 <= b <= 100 for t, b in bias.items())


def defaults_from_generation_config(gen: dict, eos_token_id) -> dict:
    """Sampling defaults from a generation_config.json dict: its eos ids, temperature/top_p/top_k/repetition
    penalty, greedy when do_sample is false; the Apertus recommendation (T 0.8, top_p 0.9) for what it lacks."""
    eos = gen.get("eos_token_id", eos_token_id)
    out = {"temperature": 0.8, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.0,
           "stop_token_ids": sorted(set(eos if isinstance(eos, list) else [eos]))}
    for k in ("temperature", "top_p", "top_k", "repetition_penalty"):
        if gen.get(k) is not None:
            out[k] = gen[k]
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompt_seen: list, out_counts: list):
    """In place on (B, V) fp32 logits. `prompt_seen[b]`: bool (V,) tokens of the prompt; `out_counts[b]`: float (V,)
    occurrences in the output so far (None for rows without penalties)."""
    for b, p in enumerate(params):
        if not p.penalized:
            continue
        row, counts = logits[b], out_counts[b]
        if p.repetition_penalty not in (None, 1.0):  # transformers' RepetitionPenaltyLogitsProcessor
            seen = prompt_seen[b] | (counts > 0)
            penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row.copy_(torch.where(seen, penalized, row))
        if p.presence_penalty or p.frequency_penalty:  # OpenAI: -= presence·[c > 0] + frequency·c
            row.sub_((counts > 0).float() * p.presence_penalty + counts * p.frequency_penalty)
    return logits


def apply_bias_and_masks(logits: torch.Tensor, params: list[SamplingParams], masks: list | None):
    """In place on (B, V) fp32 logits: each row's logit_bias, then its grammar mask (`masks[b]`: float (V,) added
    to the row, 0 for allowed tokens and -1e30 for the others, None for an unconstrained row; structured.fill_masks).
    Bias ids beyond the vocabulary are ignored (the server checks them against the tokenizer)."""
    V = logits.shape[1]
    for b, p in enumerate(params):
        if p.logit_bias:
            ids = [t for t in p.logit_bias if t < V]
            logits[b, ids] += torch.tensor([float(p.logit_bias[t]) for t in ids], device=logits.device)
    cpu = logits.numpy() if logits.device.type == "cpu" else None
    for b, m in enumerate(masks or []):
        if m is None:
            continue
        if cpu is not None:  # numpy: torch's add would start an OpenMP region (costly on a busy CPU)
            np.add(cpu[b], m.numpy(), out=cpu[b])
        else:
            logits[b] += m
    return logits


def filtered_probs(logits: torch.Tensor, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """The distribution sampled from: softmax(logits / T) restricted by top-k, top-p and min-p, renormalised.

    logits (B, V) fp32; the other arguments are (B,) tensors (top_k 0 = off, top_p 1 = off, min_p 0 = off).
    """
    B, V = logits.shape
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    n_cand = min(V, max(_CANDIDATES, int(k.max()) if bool((k < V).any()) else 0))
    vals = probs.topk(n_cand, dim=-1).values  # (B, C) descending
    # top-k, then top-p on what top-k left: keep the shortest prefix whose mass reaches top_p of the kept mass
    in_k = torch.arange(n_cand, device=logits.device)[None] < k[:, None]
    kept_mass = torch.where(k < V, (vals * in_k).sum(-1), torch.ones_like(top_p))
    exclusive = torch.cumsum(vals * in_k, dim=-1) - vals
    n = ((exclusive < top_p[:, None] * kept_mass[:, None]) & in_k).sum(-1).clamp(min=1)  # >= 1 token always kept
    unresolved = (n == n_cand) & (top_p < 1) & (vals.sum(-1) < top_p * kept_mass) & (n_cand < V)
    threshold = vals.gather(1, (n - 1)[:, None]).squeeze(1)
    threshold = torch.where((top_p >= 1) & (k >= V), torch.zeros_like(threshold), threshold)
    for b in unresolved.nonzero().flatten().tolist():  # nucleus wider than the candidates: sort the whole row
        s = probs[b].sort(descending=True).values
        ex = torch.cumsum(s[: int(k[b])], 0) - s[: int(k[b])]
        threshold[b] = s[max(int((ex < top_p[b] * kept_mass[b]).sum()), 1) - 1]
    threshold = torch.maximum(threshold, min_p * vals[:, 0])
    kept = torch.where(probs >= threshold[:, None], probs, torch.zeros_like(probs))
    return kept / kept.sum(-1, keepdim=True)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
           prompt_seen: list | None = None, out_counts: list | None = None, masks: list | None = None):
    """Choose one token per row of (B, V) logits. Returns (tokens (B,), logprobs (B,), top_ids (B, n), top_lp (B, n))
    where logprobs are the model's (raw log-softmax) and n is the largest top_logprobs asked for (0 if none).
    `masks`: per row, the grammar's additive mask or None (structured.fill_masks; None: no row is constrained)."""
    logits = raw = logits.float()
    raw_logprobs = None
    if any(p.logprobs or p.top_logprobs for p in params):
        raw_logprobs = torch.log_softmax(logits, dim=-1)
    if any(p.penalized for p in params):
        logits = apply_penalties(logits.clone(), params, prompt_seen, out_counts)
    if masks is not None or any(p.logit_bias for p in params):
        mine = logits if logits is not raw else (
            torch.from_numpy(logits.numpy().copy()) if logits.device.type == "cpu" else logits.clone())
        logits = apply_bias_and_masks(mine, params, masks)
    tokens = logits.argmax(-1)
    sampled = [b for b, p in enumerate(params) if not p.greedy]
    if sampled:
        dev = logits.device
        rows = torch.tensor(sampled, device=dev)

        def col(name, dtype):  # unresolved (None) values mean "off"
            values = [getattr(params[b], name) for b in sampled]
            off = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}.get(name)
            return torch.tensor([off if v is None else v for v in values], dtype=dtype, device=dev)

        probs = filtered_probs(logits[rows], col("temperature", torch.float32), col("top_k", torch.long),
                               col("top_p", torch.float32), col("min_p", torch.float32))
        u = torch.stack([torch.rand((), generator=generators[b]) for b in sampled]).to(dev)
        cdf = torch.cumsum(probs, dim=-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1).clamp(max=probs.shape[1] - 1)
        bad = probs.gather(1, pick[:, None]).squeeze(1) <= 0  # float edge at the very top of the CDF
        pick = torch.where(bad, probs.argmax(-1), pick)
        tokens[rows] = pick
    n_top = max(p.top_logprobs for p in params)
    if raw_logprobs is None:
        return tokens, None, None, None
    chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
    top_lp, top_ids = raw_logprobs.topk(n_top, dim=-1) if n_top else (None, None)
    return tokens, chosen, top_ids, top_lp
