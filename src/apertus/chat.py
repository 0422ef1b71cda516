"""The Apertus chat format in Python: render, tokenize with an assistant mask, parse replies.

`render` is a line-by-line port of the released template (`data/apertus_tokenizer/chat_template.jinja`, as
transformers runs it: trim_blocks, lstrip_blocks, `tojson` = json.dumps) including its quirks, so the string is
byte-identical; tests check that on many conversations. Before rendering, messages and tools in the OpenAI shape are
normalised to what the template reads (see `normalize_messages`, `normalize_tools`). Where the template would
fail, `render` raises ValueError with the template's message.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

BOS = "<s>"
SYSTEM_START, SYSTEM_END = "<|system_start|>", "<|system_end|>"
DEVELOPER_START, DEVELOPER_END = "<|developer_start|>", "<|developer_end|>"
USER_START, USER_END = "<|user_start|>", "<|user_end|>"
ASSISTANT_START, ASSISTANT_END = "<|assistant_start|>", "<|assistant_end|>"
INNER_PREFIX, INNER_SUFFIX = "<|inner_prefix|>", "<|inner_suffix|>"
TOOLS_PREFIX, TOOLS_SUFFIX = "<|tools_prefix|>", "<|tools_suffix|>"
IMAGE = "<|image|>"
TEMPLATES = Path(__file__).resolve().parent / "templates"  # the released Jinja templates, byte-identical copies
DEFAULT_SYSTEM = ("You are Apertus, a helpful assistant created by the SwissAI initiative.\n"
                  "Knowledge cutoff: 2024-04\nCurrent date: ")
STOP_IDS = (2, 68, 72)  # </s>, <|assistant_end|>, <|tools_suffix|>: the instruct generation config

_MISSING = object()  # a key the message does not have (jinja's Undefined): prints as "", is falsy


def _get(obj, key):
    return obj.get(key, _MISSING) if isinstance(obj, Mapping) else _MISSING


def _truthy(x) -> bool:
    return x is not _MISSING and bool(x)


def _out(x) -> str:
    """What `{{ x }}` prints."""
    return "" if x is _MISSING else str(x)


def _cat(*parts) -> str:
    """The template's `a + b + c`: strings only (jinja raises on anything else)."""
    for p in parts:
        if not isinstance(p, str):
            raise ValueError(f"expected a string in the chat template, got {'nothing' if p is _MISSING else repr(p)}")
    return "".join(parts)


def _tojson(x) -> str:
    return json.dumps(x, ensure_ascii=False)


# --- normalisation of the OpenAI shape ---------------------------------------------------------------------------


def _text_of(parts) -> str:
    """OpenAI content parts [{"type": "text", "text": ...}] as one string."""
    return "".join(p.get("text", "") for p in parts if isinstance(p, Mapping) and p.get("type") == "text")


def _arguments(args):
    # OpenAI sends a JSON string, many clients a dict; the template concatenates a string.
    return args if isinstance(args, str) else _tojson({} if args is None else args)


def normalize_messages(messages) -> list[dict]:
    """OpenAI-shaped messages -> what the template reads; Apertus-shaped ones pass through unchanged.

    - assistant `content: null` (or absent, with `tool_calls`) -> ""; `tool_calls[].function.arguments` given as a
      dict -> its JSON; a missing `tool_calls[].type` -> "function"
    - content given as a list of parts -> the joined text (user: `{"parts": [...]}`, images as image parts)
    - tool message content that is not a string -> its JSON (the template would print a Python repr)
    - a leading `developer` message (newer OpenAI clients) -> the system message
    """
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} is not a dict: {m!r}")
        m = dict(m)
        role, content = m.get("role"), m.get("content", _MISSING)
        if role == "developer" and i == 0:
            m["role"] = role = "system"
        if isinstance(content, list):
            if role == "user":
                m["content"] = {"parts": [
                    {"type": "image"} if isinstance(p, Mapping) and p.get("type") in ("image", "image_url")
                    else dict(p) if isinstance(p, Mapping) else {"type": "text", "text": str(p)} for p in content]}
            else:
                m["content"] = _text_of(content)
        if role == "assistant":
            if content is None or (content is _MISSING and m.get("tool_calls")):
                m["content"] = ""
            if m.get("tool_calls"):
                calls = []
                for c in m["tool_calls"]:
                    c = dict(c) if isinstance(c, Mapping) else c
                    if isinstance(c, dict):
                        c.setdefault("type", "function")
                        if isinstance(c.get("function"), Mapping):
                            c["function"] = {**c["function"], "arguments": _arguments(c["function"].get("arguments"))}
                    calls.append(c)
                m["tool_calls"] = calls
            if isinstance(m.get("content"), Mapping) and isinstance(m["content"].get("blocks"), list):
                blocks = []
                for b in m["content"]["blocks"]:
                    if isinstance(b, Mapping) and b.get("type") == "tool_calls" and isinstance(b.get("calls"), list):
                        b = {**b, "calls": [{**c, "arguments": _arguments(c.get("arguments"))}
                                            if isinstance(c, Mapping) else c for c in b["calls"]]}
                    blocks.append(b)
                m["content"] = {**m["content"], "blocks": blocks}
        if role == "tool" and content is not _MISSING and not isinstance(m["content"], str):
            m["content"] = _tojson(m["content"])
        out.append(m)
    return out


def normalize_tools(tools) -> list[dict]:
    """Tool specs, flat `{"name", "description", "parameters"}` or OpenAI-nested `{"type": "function", "function":
    {...}}`, as the flat dicts the template reads (it fails on nested ones); a missing description becomes ""."""
    if tools is None:
        return []
    out = []
    for i, t in enumerate(tools):
        if isinstance(t, Mapping) and isinstance(t.get("function"), Mapping):
            t = t["function"]
        if not isinstance(t, Mapping) or not isinstance(t.get("name"), str):
            raise ValueError(f"tool {i} needs a string 'name' (flat or OpenAI-nested under 'function'): {t!r}")
        out.append({**t, "description": t.get("description") or ""})
    return out


# --- the tool list in TypeScript-like notation (the template's two macros) ---------------------------------------


def _ts_type(spec) -> str:
    """render_typescript_type: JSON schema -> TypeScript-ish type, with the template's whitespace."""
    t, nullable = _get(spec, "type"), _truthy(_get(spec, "nullable"))
    if t == "array":
        items = _get(spec, "items")
        if _truthy(items):
            it = _get(items, "type")
            if it in ("string", "boolean"):
                s = it + "[]"
            elif it in ("number", "integer"):
                s = "number[]"
            else:
                inner = _ts_type(items)
                s = "any[]" if inner == "object | object" or len(inner) > 50 else inner + "[]"
        else:
            s = "any[]"
        return s + " | null" if nullable else s
    if isinstance(t, (list, tuple)) and t:
        return " | ".join(map(str, t)) if len(t) > 1 else str(t[0])
    one_of = _get(spec, "oneOf")
    if _truthy(one_of):
        # The template also computes `has_object_variants` but sets it inside a for loop, where jinja scoping
        # discards it, so the "any" branch never runs: every variant is listed.
        s = ""
        for k, variant in enumerate(one_of):
            s += _ts_type(variant)
            if _truthy(_get(variant, "description")):
                s += _cat("// ", _get(variant, "description"))
            if _get(variant, "default") is not _MISSING:
                s += " " * 20 + _cat("// default: ", _tojson(variant["default"]))
            if k < len(one_of) - 1:
                s += " | \n"
        return s
    if t == "string":
        enum = _get(spec, "enum")
        if _truthy(enum):
            return '"' + '" | "'.join(map(str, enum)) + '"'
        return "string | null" if nullable else "string"
    if t in ("number", "integer"):
        return "number"
    if t == "boolean":
        return "boolean"
    if t == "object":
        props = _get(spec, "properties")
        if not _truthy(props):
            return "object"
        required = _get(spec, "required")
        required = required if _truthy(required) else []
        s = "{\n"
        for k, (name, prop) in enumerate(_items(props)):
            s += str(name) + ("" if name in required else "?") + ": " + "\n" + " " * 16 + _ts_type(prop)
            if k < len(props) - 1:
                s += ", "
        return s + "}"
    return "any"


def _items(props):
    if not isinstance(props, Mapping):
        raise ValueError(f"tool parameter 'properties' must be an object, got {props!r}")
    return props.items()


def _render_tools(tools: list[dict]) -> str:
    lines = []
    for tool in tools:
        s = _cat("// ", _get(tool, "description"), "\n") + _cat("type ", _get(tool, "name"), " = ")
        params = _get(tool, "parameters")
        if _truthy(params) and _truthy(_get(params, "properties")):
            required = _get(params, "required")
            required = required if _truthy(required) else []
            s += "(_: {\n"
            props = params["properties"]
            for k, (name, spec) in enumerate(_items(props)):
                if _truthy(_get(spec, "description")):
                    s += _cat("// ", spec["description"], "\n")
                s += str(name) + ("" if name in required else "?") + ": " + _ts_type(spec)
                default = _get(spec, "default")
                if default is not _MISSING:
                    if _truthy(_get(spec, "enum")):
                        s += _cat(", // default: ", default)
                    elif _truthy(_get(spec, "oneOf")):
                        s += _cat("// default: ", default)
                    else:
                        s += ", // default: " + _tojson(default)
                s += ",\n" if k < len(props) - 1 else "\n"
            s += "}) => any;"
        else:
            s += "() => any;"
        lines.append(s)
    return "\n".join(lines)


# --- rendering -----------------------------------------------------------------------------------------------------


def _date_text(date) -> str:
    if date is None:
        return _dt.datetime.now().strftime("%Y-%m-%d")
    return date.strftime("%Y-%m-%d") if isinstance(date, (_dt.date, _dt.datetime)) else str(date)


def _tool_call_text(name, arguments) -> str:
    return _cat('{"', name, '": ', arguments, "}")


def segments(messages, tools=None, enable_thinking=False, add_generation_prompt=False, date=None,
             continue_assistant_message=False) -> list[tuple[str, bool]]:
    """The rendered chat as (text, written_by_assistant) pieces; `render` joins them, `encode_chat` masks with them."""
    try:
        return _segments(normalize_messages(messages), normalize_tools(tools), enable_thinking,
                         add_generation_prompt, date, continue_assistant_message)
    except (TypeError, KeyError, IndexError, AttributeError) as e:  # the template fails on these too
        raise ValueError(f"invalid conversation for the Apertus chat format: {e!r}") from e


def _segments(messages, tools, enable_thinking, add_generation_prompt, date, continue_assistant_message):
    out: list[tuple[str, bool]] = [(BOS, False)]

    def emit(text, assistant=False):
        out.append((text, assistant))

    if messages and messages[0].get("role") == "system":
        content = messages[0].get("content", _MISSING)
        if isinstance(content, str):
            text = content
        elif isinstance(content, Mapping) and "text" in content and isinstance(content["text"], str):
            text = content["text"]
        else:
            raise ValueError("Invalid system message")
        emit(SYSTEM_START + text + SYSTEM_END)
        loop = messages[1:]
    else:
        emit(SYSTEM_START + DEFAULT_SYSTEM + _date_text(date) + SYSTEM_END)
        loop = messages
    emit(DEVELOPER_START + "Deliberation: " + ("enabled\n" if enable_thinking else "disabled\n")
         + ("Tool Capabilities:\n" + _render_tools(tools) if tools else "Tool Capabilities: disabled")
         + DEVELOPER_END)

    in_assistant = in_tool = in_inner = waiting_for_tool_outputs = False
    assistant_format = None

    def close_tool_outputs():
        nonlocal in_tool
        if in_tool:
            emit("]")
            in_tool = False

    def emit_calls(calls, name_of):
        nonlocal waiting_for_tool_outputs
        emit(TOOLS_PREFIX + "[" + ", ".join(name_of(c) for c in calls) + "]" + TOOLS_SUFFIX, True)
        waiting_for_tool_outputs = True

    for message in loop:
        role = message.get("role")
        if role == "user":
            in_inner = False
            close_tool_outputs()
            if in_assistant:
                emit(ASSISTANT_END, True)
                in_assistant = False
            if "content" in message:
                content = message["content"]
                if isinstance(content, str):
                    text = content
                elif isinstance(content, Mapping) and "parts" in content:
                    text = ""
                    for part in content["parts"]:
                        kind = _get(part, "type")
                        if kind == "text":
                            text += _out(_get(part, "text"))
                        elif kind == "image":
                            text += IMAGE
                        else:
                            raise ValueError(f"Invalid user part: {_out(kind)}")
                else:
                    raise ValueError("Invalid user message: user")
                emit(USER_START + text + USER_END)
        elif role == "assistant":
            if not in_assistant:
                emit(ASSISTANT_START)
                in_assistant = True
            if "content" not in message:
                raise ValueError("Invalid assistant message")
            content = message["content"]
            if isinstance(content, str) and assistant_format in (None, "string"):
                close_tool_outputs()
                assistant_format = "string"
                emit(content, True)
            elif isinstance(content, Mapping) and "blocks" in content and assistant_format in (None, "mapping"):
                assistant_format = "mapping"
                for k, block in enumerate(content["blocks"]):
                    kind = _get(block, "type")
                    if kind == "thoughts":
                        close_tool_outputs()
                        if not in_inner:
                            in_inner = True
                            emit(INNER_PREFIX, True)
                        emit(_out(_get(block, "text")), True)
                    elif kind == "tool_calls":
                        close_tool_outputs()
                        calls = _get(block, "calls")
                        calls = [] if calls is _MISSING else calls
                        if in_inner and k > 0 and len(calls) == 1 and _get(calls[0], "name") == "display_answers":
                            in_inner = False
                            emit(INNER_SUFFIX, True)
                        emit_calls(calls, lambda c: _tool_call_text(_get(c, "name"), _get(c, "arguments")))
                    elif kind == "tool_outputs":
                        if in_tool:
                            raise ValueError("Cannot have both tool outputs as separate messages and tool outputs "
                                             "as blocks")
                        outputs = _get(block, "outputs")
                        outputs = [] if outputs is _MISSING else outputs
                        emit("[" + ", ".join(_out(_get(o, "output")) for o in outputs) + "]")
                        waiting_for_tool_outputs = False
                    elif kind == "response":
                        close_tool_outputs()
                        if in_inner:
                            in_inner = False
                            emit(INNER_SUFFIX, True)
                        emit(_out(_get(block, "text")), True)
                    else:
                        raise ValueError(f"Invalid assistant block type: {_out(kind)}")
            else:
                # includes mixing plain-string and block assistant messages in one conversation
                raise ValueError("Invalid assistant content")
            if message.get("tool_calls"):
                for call in message["tool_calls"]:
                    if _get(call, "type") != "function":
                        raise ValueError(f"Invalid tool call type: {_out(_get(call, 'type'))}")
                emit_calls(message["tool_calls"], lambda c: _tool_call_text(
                    _get(_get(c, "function"), "name"), _get(_get(c, "function"), "arguments")))
        elif role == "tool":
            if not in_assistant:
                raise ValueError("Tool message outside of assistant")
            emit(", " if in_tool else "[")
            in_tool = True
            emit(_out(message.get("content", _MISSING)))
            waiting_for_tool_outputs = False
        else:
            raise ValueError(f"Invalid message role: {role!r}")
    close_tool_outputs()
    if in_assistant and not continue_assistant_message and not waiting_for_tool_outputs:
        emit(ASSISTANT_END, True)
    if add_generation_prompt:
        emit(ASSISTANT_START)
    return out


def render(messages, tools=None, enable_thinking=False, add_generation_prompt=False, date=None,
           continue_assistant_message=False) -> str:
    """The prompt string the official template renders (it starts with `<s>`: tokenize without adding BOS).
    `date` (str YYYY-MM-DD or a date) fills the default system prompt; None = today, like `strftime_now`."""
    return "".join(t for t, _ in segments(messages, tools, enable_thinking, add_generation_prompt, date,
                                          continue_assistant_message))


def encode_chat(tokenizer, messages, tools=None, enable_thinking=False, add_generation_prompt=False, date=None,
                continue_assistant_message=False) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered chat (as `apply_chat_template` gives them) and a mask of the tokens the assistant
    wrote: its text, reasoning, tool calls and `<|assistant_end|>`, not the tool outputs or `<|assistant_start|>`.
    A token that straddles a boundary counts as the assistant's (the rule of transformers' assistant masks)."""
    pieces = segments(messages, tools, enable_thinking, add_generation_prompt, date, continue_assistant_message)
    inner = getattr(tokenizer, "inner", tokenizer)
    enc = inner.encode("".join(t for t, _ in pieces), add_special_tokens=False)
    owned = [0]  # prefix sums of assistant-written characters
    for text, assistant in pieces:
        owned.extend([assistant] * len(text))
    for i in range(1, len(owned)):
        owned[i] += owned[i - 1]
    mask = [owned[e] > owned[s] for s, e in enc.offsets]
    return enc.ids, mask


# --- parsing replies ------------------------------------------------------------------------------------------------

_MARKERS = re.compile("|".join(map(re.escape, (INNER_PREFIX, INNER_SUFFIX, TOOLS_PREFIX))))


@lru_cache(maxsize=1)
def _default_tokenizer():
    from .tokenizer import Tokenizer, apertus_tokenizer_path

    return Tokenizer.from_file(apertus_tokenizer_path())


def _parse_calls(raw: str) -> list[dict] | None:
    """`[{"name": {args}}, ...]` (also accepts {"name": ..., "arguments": ...} items); None if it is not that."""
    try:
        calls = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list):
        return None
    out = []
    for c in calls:
        if isinstance(c, dict) and isinstance(c.get("name"), str) and set(c) <= {"name", "arguments"}:
            name, args = c["name"], c.get("arguments", {})
        elif isinstance(c, dict) and len(c) == 1:
            name, args = next(iter(c.items()))
        else:
            return None
        out.append({"id": f"call_{len(out)}", "type": "function",
                    "function": {"name": name, "arguments": args if isinstance(args, str) else _tojson(args)}})
    return out


def parse_reply(text_or_ids, tokenizer=None) -> dict:
    """A generated assistant turn -> {"content", "reasoning_content", "tool_calls"} (OpenAI message fields).

    Reasoning is the text between `<|inner_prefix|>` and `<|inner_suffix|>` (to the end if cut off; text before a
    lone `<|inner_suffix|>` too, for prompts that opened the reasoning); tool calls come from
    `<|tools_prefix|>[...]<|tools_suffix|>`. A call that does not parse (truncated, malformed) stays in the text.
    The text is read from the last `<|assistant_start|>` up to the first stop token. Never raises on model output.
    """
    if isinstance(text_or_ids, str):
        text = text_or_ids
    else:
        ids = [int(i) for i in text_or_ids]
        # ids outside the vocabulary decode to nothing; negative ones would overflow the Rust decoder
        text = (tokenizer or _default_tokenizer()).decode([i for i in ids if 0 <= i < 2**31], skip_special_tokens=False)
    text = text.rsplit(ASSISTANT_START, 1)[-1]
    for stop in (ASSISTANT_END, "</s>"):
        text = text.split(stop, 1)[0]
    content, reasoning, calls = [], [], []
    in_inner, saw_inner, pos = False, False, 0
    while True:
        m = _MARKERS.search(text, pos)
        (reasoning if in_inner else content).append(text[pos:m.start() if m else len(text)])
        if m is None:
            break
        pos = m.end()
        if m.group() == INNER_PREFIX:
            in_inner = saw_inner = True
        elif m.group() == INNER_SUFFIX:
            if not saw_inner:  # the prompt ended with <|inner_prefix|>: what came before was reasoning
                reasoning, content, saw_inner = content, [], True
            in_inner = False
        else:
            end = text.find(TOOLS_SUFFIX, pos)
            raw = text[pos:end if end >= 0 else len(text)]
            pos = len(text) if end < 0 else end + len(TOOLS_SUFFIX)
            parsed = _parse_calls(raw)
            if parsed is None:
                (reasoning if in_inner else content).append(raw)
            else:
                calls += [{**c, "id": f"call_{len(calls) + k}"} for k, c in enumerate(parsed)]
    return {"content": "".join(content), "reasoning_content": "".join(reasoning) if saw_inner else None,
            "tool_calls": calls}


def official_template() -> str:
    """The released Jinja chat template (a package file, byte-identical to the instruct model's), for tokenizer
    directories that transformers/vLLM read."""
    return (TEMPLATES / "chat_template.jinja").read_text(encoding="utf-8")
