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

from . import chat_template as jt
from .chat_template import normalize_messages, normalize_tools  # noqa: F401 (part of this module's API)

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

# --- rendering -----------------------------------------------------------------------------------------------------


def _date_text(date) -> str:
    if date is None:
        return _dt.datetime.now().strftime("%Y-%m-%d")
    return date.strftime("%Y-%m-%d") if isinstance(date, (_dt.date, _dt.datetime)) else str(date)


def _tool_call_text(name, arguments) -> str:
    return jt.cat('{"', name, '": ', arguments, "}")


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
        content = messages[0].get("content", jt.MISSING)
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
         + ("Tool Capabilities:\n" + jt.render_tools(tools) if tools else "Tool Capabilities: disabled")
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
                        kind = jt.get(part, "type")
                        if kind == "text":
                            text += jt.printed(jt.get(part, "text"))
                        elif kind == "image":
                            text += IMAGE
                        else:
                            raise ValueError(f"Invalid user part: {jt.printed(kind)}")
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
                    kind = jt.get(block, "type")
                    if kind == "thoughts":
                        close_tool_outputs()
                        if not in_inner:
                            in_inner = True
                            emit(INNER_PREFIX, True)
                        emit(jt.printed(jt.get(block, "text")), True)
                    elif kind == "tool_calls":
                        close_tool_outputs()
                        calls = jt.get(block, "calls")
                        calls = [] if calls is jt.MISSING else calls
                        if in_inner and k > 0 and len(calls) == 1 and jt.get(calls[0], "name") == "display_answers":
                            in_inner = False
                            emit(INNER_SUFFIX, True)
                        emit_calls(calls, lambda c: _tool_call_text(jt.get(c, "name"), jt.get(c, "arguments")))
                    elif kind == "tool_outputs":
                        if in_tool:
                            raise ValueError("Cannot have both tool outputs as separate messages and tool outputs "
                                             "as blocks")
                        outputs = jt.get(block, "outputs")
                        outputs = [] if outputs is jt.MISSING else outputs
                        emit("[" + ", ".join(jt.printed(jt.get(o, "output")) for o in outputs) + "]")
                        waiting_for_tool_outputs = False
                    elif kind == "response":
                        close_tool_outputs()
                        if in_inner:
                            in_inner = False
                            emit(INNER_SUFFIX, True)
                        emit(jt.printed(jt.get(block, "text")), True)
                    else:
                        raise ValueError(f"Invalid assistant block type: {jt.printed(kind)}")
            else:
                # includes mixing plain-string and block assistant messages in one conversation
                raise ValueError("Invalid assistant content")
            if message.get("tool_calls"):
                for call in message["tool_calls"]:
                    if jt.get(call, "type") != "function":
                        raise ValueError(f"Invalid tool call type: {jt.printed(jt.get(call, 'type'))}")
                emit_calls(message["tool_calls"], lambda c: _tool_call_text(
                    jt.get(jt.get(c, "function"), "name"), jt.get(jt.get(c, "function"), "arguments")))
        elif role == "tool":
            if not in_assistant:
                raise ValueError("Tool message outside of assistant")
            emit(", " if in_tool else "[")
            in_tool = True
            emit(jt.printed(message.get("content", jt.MISSING)))
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


CHAT_FORMATS = ("release", "apertus-sft")


def encode_chat(tokenizer, messages, tools=None, enable_thinking=False, add_generation_prompt=False, date=None,
                continue_assistant_message=False, format="release") -> tuple[list[int], list[bool]]:
    """Token ids of the rendered chat (as `apply_chat_template` gives them) and a mask of the tokens the assistant
    wrote: its text, reasoning, tool calls and `<|assistant_end|>`, not the tool outputs or `<|assistant_start|>`.
    A token that straddles a boundary counts as the assistant's (the rule of transformers' assistant masks).

    `format`: "release", the released template (what inference uses), or "apertus-sft", the template Apertus was
    fine-tuned with (chat_sft.py; `<s>` + its text, ids 61-72 as the tokenizer names them; `date` and
    `continue_assistant_message` do not apply to it)."""
    if format == "release":
        pieces = segments(messages, tools, enable_thinking, add_generation_prompt, date, continue_assistant_message)
    elif format == "apertus-sft":
        from .chat_sft import SFT_TOKEN_IDS, sft_messages, sft_segments

        pieces = [(BOS, False)] + sft_segments(sft_messages(messages, tools, enable_thinking), add_generation_prompt)
    else:
        raise ValueError(f"unknown chat format {format!r}; use one of {', '.join(CHAT_FORMATS)}")
    inner = getattr(tokenizer, "inner", tokenizer)
    if format == "apertus-sft":  # the SFT-time names <SPECIAL_61>... -> whatever this tokenizer calls ids 61-72
        names = {name: inner.id_to_token(i) for name, i in SFT_TOKEN_IDS.items()}
        if None in names.values():
            raise ValueError("the tokenizer has no ids 61-72, the Apertus chat tokens the apertus-sft format needs")
        pattern = re.compile("|".join(map(re.escape, names)))
        pieces = [(pattern.sub(lambda m: names[m.group()], t), a) for t, a in pieces]
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


def parse_calls(raw: str) -> list[dict] | None:
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
                    "function": {"name": name, "arguments": args if isinstance(args, str) else jt.tojson(args)}})
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
            parsed = parse_calls(raw)
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
