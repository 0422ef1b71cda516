"""The OpenAI request and response shapes for the server: parsing and validation of request bodies, the chat prompt
(Apertus chat format), sampling parameters, log-probabilities, and the reply parser for streamed text.

Status codes: 400 for a value that is wrong (out of range, unknown role, prompt beyond the context, unsupported
feature), 422 for a body of the wrong shape (wrong type, missing field), both in OpenAI's error JSON. Unknown fields
are ignored (as vLLM does), so clients that send newer fields keep working.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..chat import INNER_PREFIX, INNER_SUFFIX, STOP_IDS, TOOLS_PREFIX, TOOLS_SUFFIX, parse_calls, render
from .sampler import MAX_TOP_LOGPROBS, SamplingParams
from .structured import lenient, tool_call_grammar

MAX_N = 16  # choices per request (OpenAI allows 128; each is a full generation here)
MAX_STOP = 16  # stop strings per request, each at most 1,000 characters
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_CHOICES = 128  # prompts x n in one request
MAX_BIAS = 1024  # logit_bias entries per request
ROLES = ("system", "developer", "user", "assistant", "tool")
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


class APIError(Exception):
    """An error the client caused (or 503 when busy); rendered as OpenAI's `{"error": {...}}` JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# --- request bodies ------------------------------------------------------------------------------------------------


def _no_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:20]} is out of range")
    return x


def parse_body(raw: bytes) -> dict:
    """A request body as a JSON object: strict UTF-8, no NaN/Infinity, no lone surrogates (the tokenizer cannot take
    them), bounded nesting."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the request holds a string with an unpaired UTF-16 surrogate (\\ud800-\\udfff)") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    return data


class _Strict(BaseModel):
    # strict: "1" is not a number and 1 is not a bool, as in OpenAI's API; unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Strict):
    type: str
    text: str | None = None


class FunctionCall(_Strict):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool | None = None


class JsonSchemaFormat(_Strict):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: str
    json_schema: JsonSchemaFormat | None = None


class _Common(_Strict):
    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None  # on /v1/completions too, as vLLM
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    return_token_ids: bool | None = False  # vLLM: prompt_token_ids and each choice's token_ids (not streamed)


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # thinking: vLLM's chat_template_kwargs {"enable_thinking": true}, or the top-level alias, or reasoning_effort
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    continue_final_message: bool | None = False  # vLLM: the reply continues the last assistant message


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for the legacy endpoint
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


def validate(schema: type[BaseModel], data: dict):
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = ".".join(str(x) for x in err["loc"])
        raise APIError(422, f"{param}: {err['msg']}" + (f" (and {e.error_count() - 1} more errors)"
                                                         if e.error_count() > 1 else ""), param=param) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None


# --- sampling --------------------------------------------------------------------------------------------------------


def _check(ok: bool, param: str, message: str):
    if not ok:
        raise APIError(400, f"{param}: {message}", param=param)


def _logit_bias(req, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias ({"token id": bias}) as ids; 400 for a key that is no token id or a bias beyond 100."""
    if not req.logit_bias:
        return None
    _check(len(req.logit_bias) <= MAX_BIAS, "logit_bias", f"at most {MAX_BIAS} tokens")
    out = {}
    for key, bias in req.logit_bias.items():
        _check(key.isascii() and key.isdigit() and int(key) < vocab_size, "logit_bias",
               f"key {key[:20]!r} is not a token id in [0, {vocab_size})")
        _check(-100 <= bias <= 100, "logit_bias", f"bias {bias} of token {key} must be in [-100, 100]")
        out[int(key)] = float(bias)
    return out


def response_format(req) -> dict:
    """The SamplingParams fields of response_format: {} for text, a JSON Schema for json_object / json_schema
    (strict: keywords the grammar library cannot enforce are a 400; otherwise they are ignored)."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return {}
    if fmt.type == "json_object":
        return {"json_schema": {"type": "object"}}
    where = "response_format.json_schema"
    _check(fmt.type == "json_schema", "response_format.type",
           f"{fmt.type[:40]!r} is not one of 'text', 'json_object', 'json_schema'")
    _check(fmt.json_schema is not None, where, "is required when type is 'json_schema'")
    spec = fmt.json_schema
    _check(bool(_TOOL_NAME.match(spec.name)), where + ".name", f"{spec.name[:80]!r} must be 1-64 letters, digits, "
           "'_' or '-'")
    schema = spec.schema_ if spec.schema_ is not None else {}
    _check_schema(schema, where + ".schema")
    return {"json_schema": schema if spec.strict else lenient(schema)}


def _check_schema(schema: dict, where: str):
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise APIError(400, f"{where}: not a valid JSON Schema: {e.message[:300]}", param=where) from None
    except RecursionError:
        raise APIError(400, f"{where}: nested too deeply", param=where) from None


def sampling_params(req, max_tokens: int | None, logprobs: bool, top_logprobs: int,
                    stop_token_ids: list[int] | None, vocab_size: int) -> list[SamplingParams]:
    """One SamplingParams per choice (n of them); choice i of a seeded request uses seed + i."""
    n = 1 if req.n is None else req.n
    _check(1 <= n <= MAX_N, "n", f"must be in [1, {MAX_N}], got {n}")
    _check(max_tokens is None or max_tokens >= 1, "max_tokens", f"must be >= 1, got {max_tokens}")
    _check(req.temperature is None or 0 <= req.temperature <= 2, "temperature", "must be in [0, 2]")
    _check(req.top_p is None or 0 < req.top_p <= 1, "top_p", "must be in (0, 1]")
    for name in ("presence_penalty", "frequency_penalty"):
        _check(getattr(req, name) is None or -2 <= getattr(req, name) <= 2, name, "must be in [-2, 2]")
    _check(req.top_k is None or req.top_k >= -1, "top_k", "must be >= 0 (0 or -1 = off)")
    _check(req.min_p is None or 0 <= req.min_p <= 1, "min_p", "must be in [0, 1]")
    _check(req.repetition_penalty is None or 0 < req.repetition_penalty <= 10, "repetition_penalty",
           "must be in (0, 10]")
    _check(0 <= top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]")
    _check(req.seed is None or -2**63 <= req.seed < 2**64 - MAX_N, "seed", "must fit in 64 bits")
    bias = _logit_bias(req, vocab_size)
    _check(req.stream or req.stream_options is None, "stream_options", "is only allowed when stream is true")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    _check(len(stop) <= MAX_STOP and all(0 < len(s) <= 1000 for s in stop), "stop",
           f"at most {MAX_STOP} non-empty strings of at most 1,000 characters")
    return [SamplingParams(
        temperature=req.temperature, top_p=req.top_p, top_k=0 if req.top_k == -1 else req.top_k,
        min_p=req.min_p or 0.0, repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        seed=None if req.seed is None else (req.seed + i) % 2**64, max_tokens=max_tokens, stop=stop,
        stop_token_ids=stop_token_ids, ignore_eos=bool(req.ignore_eos), logprobs=logprobs,
        top_logprobs=top_logprobs, logit_bias=bias) for i in range(n)]


# --- chat ------------------------------------------------------------------------------------------------------------


def _check_tools(tools: list[Tool]) -> list[dict]:
    out, names = [], set()
    for i, tool in enumerate(tools):
        f = tool.function
        _check(bool(_TOOL_NAME.match(f.name)), f"tools.{i}.function.name",
               f"{f.name[:80]!r} must be 1-64 letters, digits, '_' or '-'")
        _check(f.name not in names, f"tools.{i}.function.name", f"{f.name!r} is defined twice")
        names.add(f.name)
        if f.parameters is not None:
            where = f"tools.{i}.function.parameters"
            _check_schema(f.parameters, where)
            _check(f.parameters.get("type", "object") == "object", where, 'the schema must have "type": "object"')
        out.append({"type": "function", "function": f.model_dump(exclude_none=True)})
    return out


def _thinking(req: ChatRequest) -> bool:
    kwargs = req.chat_template_kwargs or {}
    if "enable_thinking" in kwargs:
        _check(isinstance(kwargs["enable_thinking"], bool), "chat_template_kwargs.enable_thinking", "must be a bool")
        return kwargs["enable_thinking"]
    if req.enable_thinking is not None:
        return req.enable_thinking
    return req.reasoning_effort not in (None, "none", "minimal")


def chat_prompt(req: ChatRequest, tokenizer) -> tuple[list[int], str, bool, dict]:
    """(prompt ids, forced reply prefix, whether tools were offered, constraint: the SamplingParams fields of
    constrained decoding).

    The prompt is the Apertus chat format. After a tool result the model continues the same assistant turn (the
    format it was trained on) instead of opening a new one. tool_choice "required" or a named function writes the
    start of the call into the prompt (`<|tools_prefix|>` or `<|tools_prefix|>[{"name":`), so the model has to call;
    "none" does not show the tools to the model. A forced call is also constrained to the declared tools: names and
    arguments by their schemas (structured.tool_call_grammar); response_format constrains any other reply.
    """
    _check(len(req.messages) > 0, "messages", "must hold at least one message")
    messages = []
    for i, m in enumerate(req.messages):
        _check(m.role in ROLES, f"messages.{i}.role",
               f"unknown role {m.role[:40]!r}; expected one of {', '.join(ROLES)}")
        if isinstance(m.content, list):
            for k, part in enumerate(m.content):
                where = f"messages.{i}.content.{k}"
                _check(part.type == "text", where, f"content part type {part.type[:40]!r} is not supported (text only)")
                _check(part.text is not None, where + ".text", "a text part needs its text")
        _check(m.content is not None or (m.role == "assistant" and m.tool_calls), f"messages.{i}.content",
               "is required (only an assistant message with tool_calls may omit it)")
        _check(not m.tool_calls or m.role == "assistant", f"messages.{i}.tool_calls", "only assistant messages")
        messages.append(m.model_dump(exclude_none=True, include={"role", "content", "tool_calls"}))
        if m.content is None:
            messages[-1]["content"] = None
    try:
        tools = _check_tools(req.tools) if req.tools else None
    except RecursionError:
        raise APIError(400, "tools: a parameter schema is nested too deeply", param="tools") from None
    choice = req.tool_choice
    names = {t["function"]["name"] for t in tools or []}
    if isinstance(choice, NamedToolChoice):
        _check(choice.function.name in names, "tool_choice", f"function {choice.function.name[:80]!r} is not in tools")
    _check(choice in (None, "none", "auto") or bool(tools), "tool_choice", "needs tools")
    prefix = ""
    if choice == "required":
        prefix = TOOLS_PREFIX
    elif isinstance(choice, NamedToolChoice):
        prefix = TOOLS_PREFIX + "[{" + json.dumps(choice.function.name) + ":"
    constraint = response_format(req)
    if prefix:
        _check(not constraint, "response_format", "cannot constrain a reply that tool_choice forces to be a call")
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        constraint = {"grammar": tool_call_grammar(tools, named, parallel=req.parallel_tool_calls is not False)}
    last = messages[-1]["role"]
    continue_turn = last == "tool" or (bool(req.continue_final_message) and last == "assistant")
    _check(not req.continue_final_message or last == "assistant", "continue_final_message",
           "needs an assistant message last")
    offered = bool(tools) and choice != "none"
    try:
        text = render(messages, tools=tools if offered else None, enable_thinking=_thinking(req),
                      add_generation_prompt=not continue_turn, continue_assistant_message=continue_turn)
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    except RecursionError:
        raise APIError(400, "tools: a parameter schema is nested too deeply", param="tools") from None
    return tokenizer.encode(text + prefix, bos=False), prefix, offered, constraint


def chat_stop_ids(defaults: dict) -> list[int]:
    """The checkpoint's stop ids plus the chat format's (</s>, <|assistant_end|>, <|tools_suffix|>): a base
    checkpoint's generation config stops on </s> only, but a chat turn ends on the others (SPEC §8, pitfall 4)."""
    return sorted(set(defaults.get("stop_token_ids") or []) | set(STOP_IDS))


class ReplyParser:
    """`chat.parse_reply` for a stream: feed text pieces, get (reasoning, content) to show now; tool calls come at
    the end. A marker split across pieces is held back until it is whole. One difference: an `<|inner_suffix|>`
    with no `<|inner_prefix|>` before it only switches to content (what was streamed as content stays content).
    The non-streamed reply goes through the same parser, so streamed and whole replies agree."""

    _MARKERS = (INNER_PREFIX, INNER_SUFFIX, TOOLS_PREFIX)

    def __init__(self):
        self.in_inner = self.saw_inner = False
        self.raw_call: str | None = None  # text after <|tools_prefix|> while a call is being read
        self.calls: list[dict] = []
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        s, self._held = self._held + text, ""
        out = {True: [], False: []}
        while s:
            if self.raw_call is not None:
                self.raw_call += s
                end = self.raw_call.find(TOOLS_SUFFIX)
                if end < 0:
                    break
                self.raw_call, s = self.raw_call[:end], self.raw_call[end + len(TOOLS_SUFFIX):]
                out[self.in_inner].append(self._end_call())
                continue
            hits = [(s.find(m), m) for m in self._MARKERS if m in s]
            if not hits:
                keep = max((k for m in self._MARKERS for k in range(1, len(m)) if s.endswith(m[:k])), default=0)
                out[self.in_inner].append(s[:len(s) - keep])
                self._held = s[len(s) - keep:]
                break
            at, marker = min(hits)
            out[self.in_inner].append(s[:at])
            s = s[at + len(marker):]
            if marker == INNER_PREFIX:
                self.in_inner = self.saw_inner = True
            elif marker == INNER_SUFFIX:
                self.in_inner, self.saw_inner = False, True
            else:
                self.raw_call = ""
        return "".join(out[True]), "".join(out[False])

    def _end_call(self) -> str:
        """Parse the call text read so far; the text itself if it is not a call (malformed, truncated)."""
        raw, self.raw_call = self.raw_call, None
        calls = parse_calls(raw)
        if calls is None:
            return raw
        self.calls += calls
        return ""

    def finish(self) -> tuple[str, str]:
        """What is still held back, as (reasoning, content)."""
        text, self._held = self._held, ""
        if self.raw_call is not None:
            text += self._end_call()
        return (text, "") if self.in_inner else ("", text)


# --- log-probabilities -----------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[str, int]:
    from ..tokenizer import byte_to_unicode

    return {c: b for b, c in byte_to_unicode().items()}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes of one token. A token holding part of a UTF-8 character decodes to U+FFFD; its bytes come from its
    vocabulary string mapped back through the byte-level alphabet."""
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:
        piece, table = tokenizer.inner.id_to_token(token_id) or "", _byte_alphabet()
        if piece and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    return text.encode("utf-8")


def _token(tokenizer, token_id: int) -> tuple[str, list[int]]:
    b = token_bytes(tokenizer, token_id)
    return b.decode("utf-8", errors="backslashreplace"), list(b)


def chat_logprobs(tokenizer, ids, logprobs, tops) -> dict:
    content = []
    for k, (t, lp) in enumerate(zip(ids, logprobs, strict=True)):
        text, b = _token(tokenizer, t)
        entry = {"token": text, "logprob": lp, "bytes": b, "top_logprobs": []}
        for tid, tlp in (tops[k] if tops else []):
            tt, tb = _token(tokenizer, tid)
            entry["top_logprobs"].append({"token": tt, "logprob": tlp, "bytes": tb})
        content.append(entry)
    return {"content": content}


def completion_logprobs(tokenizer, ids, logprobs, tops, offset: int = 0) -> dict:
    tokens = [_token(tokenizer, t)[0] for t in ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": list(logprobs), "text_offset": offsets,
            "top_logprobs": [{_token(tokenizer, i)[0]: lp for i, lp in step} for step in tops] if tops else None}
