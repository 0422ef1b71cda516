"""Constrained decoding (structured outputs) through llguidance: JSON Schemas, Lark grammars, and the Apertus tool-call
format `<|tools_prefix|>[{"name": {...arguments}}]<|tools_suffix|>` with each call's arguments held to its tool's
schema.

llguidance (not xgrammar) because it needs no grammar precompilation over the vocabulary (a new schema costs
milliseconds, so every request may bring its own), its wheel has no dependencies, and computing one row's mask
takes some 10-150 µs on a CPU core. The engine keeps one `LLMatcher` per constrained request: before each sampling
step the matcher writes the row's token bitmask (allowed = 1), the sampler sets the other logits to -inf, and the
accepted token advances the matcher. A request ends when its grammar is complete (the matcher stops), on a stop
token the grammar allows, or at max_tokens.

JSON is generated compactly (no whitespace between tokens: `{"a":1,"b":[2,3]}`), so a model cannot spend its
token budget on blank space. `strict` (OpenAI's json_schema.strict) decides what happens to a schema keyword the
library cannot enforce: an error when strict, ignored otherwise (llguidance's "lenient" option, which a schema can
also set itself in its "x-guidance" object).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict

import numpy as np
import torch

from .sampler import SamplingParams

JSON_OPTIONS = {"whitespace_flexible": False}
# added to the logits of forbidden tokens: finite, so a row whose grammar allows nothing (a matcher in error) gives
# no NaN, and large enough that exp() of it is exactly 0 in fp32 at any temperature
MASKED = -1e30
_TOKENIZERS: dict[tuple, object] = {}  # (sha256 of tokenizer.json, vocab, eos) -> LLTokenizer (~1-8 s to build)
_TOKENIZERS_LOCK = threading.Lock()


def llg_tokenizer(inner, vocab_size: int, eos_id: int):
    """llguidance's view of a `tokenizers.Tokenizer` (its JSON), padded to the model's vocabulary (ids beyond the
    tokenizer are never allowed). Built once per process and tokenizer: it walks the whole vocabulary."""
    import llguidance

    text = inner.to_str()
    key = (hashlib.sha256(text.encode()).hexdigest(), vocab_size, eos_id)
    with _TOKENIZERS_LOCK:
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=eos_id)
        return _TOKENIZERS[key]


def lenient(schema: dict) -> dict:
    """The schema with llguidance's option to ignore keywords it cannot enforce (OpenAI's strict: false)."""
    return {**schema, "x-guidance": {**schema.get("x-guidance", {}), "lenient": True}}


def grammar_of(params: SamplingParams) -> str:
    """The llguidance grammar (its JSON form) of a constrained request."""
    from llguidance import LLMatcher

    if params.json_schema is not None:
        return LLMatcher.grammar_from_json_schema(params.json_schema, defaults=JSON_OPTIONS)
    return LLMatcher.grammar_from_lark(params.grammar)


class Grammars:
    """An engine's grammar compiler: the llguidance tokenizer (built on first use) and the last compiled grammars
    (a matcher in its start state per grammar; each request gets a copy, which is cheap)."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: int, cached: int = 64):
        self.tokenizer, self.vocab_size, self.eos_id, self.cached = tokenizer, vocab_size, eos_id, cached
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, params: SamplingParams):
        """A fresh matcher for the request's grammar; ValueError naming the problem when the grammar is invalid."""
        import llguidance

        if self.tokenizer is None:
            raise ValueError("engine: constrained decoding (json_schema / grammar) needs a tokenizer")
        try:
            grammar = grammar_of(params)
        except (ValueError, TypeError) as e:
            raise ValueError(f"engine: invalid grammar: {e}") from None
        with self._lock:
            start = self._compiled.get(grammar)
            if start is not None:
                self._compiled.move_to_end(grammar)
                return start.deep_copy()
        lt = llg_tokenizer(self.tokenizer.inner, self.vocab_size, self.eos_id)
        error = llguidance.LLMatcher.validate_grammar(grammar, lt)
        if error:
            what = "JSON schema" if params.json_schema is not None else "grammar"
            raise ValueError(f"engine: the {what} cannot be used for constrained decoding: {error[:500]}")
        start = llguidance.LLMatcher(lt, grammar, log_level=0)
        with self._lock:
            self._compiled[grammar] = start
            while len(self._compiled) > self.cached:
                self._compiled.popitem(last=False)
        return start.deep_copy()


def fill_masks(matchers: list, vocab_size: int, device) -> list | None:
    """Per row, what to add to its logits: float32 (V,) of 0 (allowed) or MASKED, or None for an unconstrained row;
    None when no row is constrained. Built with numpy: element-wise torch ops over 131k logits each start an OpenMP
    region, which on a busy CPU costs more than the mask itself."""
    rows = [b for b, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    bits = np.empty((len(rows), (vocab_size + 31) // 32), dtype=np.int32)
    for k, b in enumerate(rows):  # llguidance.torch's helper would import torch.compile machinery (seconds)
        matchers[b].unsafe_compute_mask_ptr(bits[k].ctypes.data, bits[k].nbytes)
    add = np.unpackbits(bits.view(np.uint8), axis=1, count=vocab_size, bitorder="little").astype(np.float32)
    add -= 1
    add *= -MASKED
    masks = [None] * len(matchers)
    for k, b in enumerate(rows):
        masks[b] = torch.from_numpy(add[k]).to(device, non_blocking=True)
    return masks


# --- tool calls ------------------------------------------------------------------------------------------------------


def _lark_string(s: str) -> str:
    """A Lark string literal matching exactly the JSON encoding of s."""
    return json.dumps(json.dumps(s))


def _schema(tool: dict) -> str:
    """A tool's parameter schema for `%json` in Lark, compact like the JSON of response_format."""
    schema = tool["function"].get("parameters") or {"type": "object"}
    return json.dumps({**schema, "x-guidance": {**JSON_OPTIONS, **schema.get("x-guidance", {})}})


def _call(tool: dict) -> str:
    """`{"name": {...arguments}}` for one tool: the name as a literal, the arguments by its parameter schema."""
    return f'"{{" {_lark_string(tool["function"]["name"])} ": " %json {_schema(tool)} "}}"'


def tool_call_grammar(tools: list[dict], named: str | None = None, parallel: bool = True) -> str:
    """Lark grammar (llguidance) of what follows the prompt's forced start of a call: after `<|tools_prefix|>`
    (tool_choice "required": one call, or several when parallel) or after `<|tools_prefix|>[{"name":` (a named
    function: its arguments). Ends with `<|tools_suffix|>`, the token that ends the turn."""
    if named is not None:
        tool = next(t for t in tools if t["function"]["name"] == named)
        return f'start: " "? %json {_schema(tool)} "}}]" <|tools_suffix|>'
    calls = " | ".join(f"call_{i}" for i in range(len(tools)))
    rules = "\n".join(f"call_{i}: {_call(t)}" for i, t in enumerate(tools))
    more = ' (", " call)*' if parallel else ""
    return f'start: "[" call{more} "]" <|tools_suffix|>\ncall: {calls}\n{rules}'
