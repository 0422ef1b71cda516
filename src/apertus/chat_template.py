"""What the two Apertus chat templates share: jinja's value semantics, the OpenAI-shape normalisation, and the tool
list in TypeScript-like notation (the release template's macros; the SFT format prints the same text).

chat.py ports the release template and chat_sft.py the SFT one; both are built from these pieces so that each
quirk of jinja (an absent key prints as "", `+` accepts only strings) is written once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

MISSING = object()  # a key the message does not have (jinja's Undefined): prints as "", is falsy


def get(obj, key):
    return obj.get(key, MISSING) if isinstance(obj, Mapping) else MISSING


def truthy(x) -> bool:
    return x is not MISSING and bool(x)


def printed(x) -> str:
    """What `{{ x }}` prints."""
    return "" if x is MISSING else str(x)


def cat(*parts) -> str:
    """The template's `a + b + c`: strings only (jinja raises on anything else)."""
    for p in parts:
        if not isinstance(p, str):
            raise ValueError(f"expected a string in the chat template, got {'nothing' if p is MISSING else repr(p)}")
    return "".join(parts)


def tojson(x) -> str:
    return json.dumps(x, ensure_ascii=False)


# --- normalisation of the OpenAI shape ---------------------------------------------------------------------------


def text_of(parts) -> str:
    """OpenAI content parts [{"type": "text", "text": ...}] as one string."""
    return "".join(p.get("text", "") for p in parts if isinstance(p, Mapping) and p.get("type") == "text")


def arguments(args):
    # OpenAI sends a JSON string, many clients a dict; the template concatenates a string.
    return args if isinstance(args, str) else tojson({} if args is None else args)


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
        role, content = m.get("role"), m.get("content", MISSING)
        if role == "developer" and i == 0:
            m["role"] = role = "system"
        if isinstance(content, list):
            if role == "user":
                m["content"] = {"parts": [
                    {"type": "image"} if isinstance(p, Mapping) and p.get("type") in ("image", "image_url")
                    else dict(p) if isinstance(p, Mapping) else {"type": "text", "text": str(p)} for p in content]}
            else:
                m["content"] = text_of(content)
        if role == "assistant":
            if content is None or (content is MISSING and m.get("tool_calls")):
                m["content"] = ""
            if m.get("tool_calls"):
                calls = []
                for c in m["tool_calls"]:
                    c = dict(c) if isinstance(c, Mapping) else c
                    if isinstance(c, dict):
                        c.setdefault("type", "function")
                        if isinstance(c.get("function"), Mapping):
                            c["function"] = {**c["function"], "arguments": arguments(c["function"].get("arguments"))}
                    calls.append(c)
                m["tool_calls"] = calls
            if isinstance(m.get("content"), Mapping) and isinstance(m["content"].get("blocks"), list):
                blocks = []
                for b in m["content"]["blocks"]:
                    if isinstance(b, Mapping) and b.get("type") == "tool_calls" and isinstance(b.get("calls"), list):
                        b = {**b, "calls": [{**c, "arguments": arguments(c.get("arguments"))}
                                            if isinstance(c, Mapping) else c for c in b["calls"]]}
                    blocks.append(b)
                m["content"] = {**m["content"], "blocks": blocks}
        if role == "tool" and content is not MISSING and not isinstance(m["content"], str):
            m["content"] = tojson(m["content"])
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


def ts_type(spec) -> str:
    """render_typescript_type: JSON schema -> TypeScript-ish type, with the template's whitespace."""
    t, nullable = get(spec, "type"), truthy(get(spec, "nullable"))
    if t == "array":
        items = get(spec, "items")
        if truthy(items):
            it = get(items, "type")
            if it in ("string", "boolean"):
                s = it + "[]"
            elif it in ("number", "integer"):
                s = "number[]"
            else:
                inner = ts_type(items)
                s = "any[]" if inner == "object | object" or len(inner) > 50 else inner + "[]"
        else:
            s = "any[]"
        return s + " | null" if nullable else s
    if isinstance(t, (list, tuple)) and t:
        return " | ".join(map(str, t)) if len(t) > 1 else str(t[0])
    one_of = get(spec, "oneOf")
    if truthy(one_of):
        # The template also computes `has_object_variants` but sets it inside a for loop, where jinja scoping
        # discards it, so the "any" branch never runs: every variant is listed.
        s = ""
        for k, variant in enumerate(one_of):
            s += ts_type(variant)
            if truthy(get(variant, "description")):
                s += cat("// ", get(variant, "description"))
            if get(variant, "default") is not MISSING:
                s += " " * 20 + cat("// default: ", tojson(variant["default"]))
            if k < len(one_of) - 1:
                s += " | \n"
        return s
    if t == "string":
        enum = get(spec, "enum")
        if truthy(enum):
            return '"' + '" | "'.join(map(str, enum)) + '"'
        return "string | null" if nullable else "string"
    if t in ("number", "integer"):
        return "number"
    if t == "boolean":
        return "boolean"
    if t == "object":
        props = get(spec, "properties")
        if not truthy(props):
            return "object"
        required = get(spec, "required")
        required = required if truthy(required) else []
        s = "{\n"
        for k, (name, prop) in enumerate(properties_of(props)):
            s += str(name) + ("" if name in required else "?") + ": " + "\n" + " " * 16 + ts_type(prop)
            if k < len(props) - 1:
                s += ", "
        return s + "}"
    return "any"


def properties_of(props):
    if not isinstance(props, Mapping):
        raise ValueError(f"tool parameter 'properties' must be an object, got {props!r}")
    return props.items()


def render_tools(tools: list[dict]) -> str:
    lines = []
    for tool in tools:
        s = cat("// ", get(tool, "description"), "\n") + cat("type ", get(tool, "name"), " = ")
        params = get(tool, "parameters")
        if truthy(params) and truthy(get(params, "properties")):
            required = get(params, "required")
            required = required if truthy(required) else []
            s += "(_: {\n"
            props = params["properties"]
            for k, (name, spec) in enumerate(properties_of(props)):
                if truthy(get(spec, "description")):
                    s += cat("// ", spec["description"], "\n")
                s += str(name) + ("" if name in required else "?") + ": " + ts_type(spec)
                default = get(spec, "default")
                if default is not MISSING:
                    if truthy(get(spec, "enum")):
                        s += cat(", // default: ", default)
                    elif truthy(get(spec, "oneOf")):
                        s += cat("// default: ", default)
                    else:
                        s += ", // default: " + tojson(default)
                s += ",\n" if k < len(props) - 1 else "\n"
            s += "}) => any;"
        else:
            s += "() => any;"
        lines.append(s)
    return "\n".join(lines)
