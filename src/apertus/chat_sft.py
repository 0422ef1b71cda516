"""The chat format Apertus was fine-tuned with (its SFT template), next to the released one in chat.py.

`render_sft` is a line-by-line port of `templates/sft_chat_template.jinja` (swiss-ai/posttraining
`CHAT_TEMPLATES["apertus"]`, copied byte for byte), quirks included, so the string is byte-identical to what jinja2
renders; tests check that on many conversations. It differs from the released template in:
- an empty system block `<SPECIAL_61><SPECIAL_62>` when no system message is given (no default system prompt, no date);
- deliberation and tools come from a `developer` message (`{"has_thinking": bool, "formatted_tools": str}`) after
  the system one, not from arguments;
- each assistant message is wrapped in its own start/end tokens; tool outputs are blocks inside the assistant message
  (`[...]`, a space before the next block), and there is no `tool` role or `tool_calls` field;
- the special tokens carry their SFT-time names `<SPECIAL_61>`...`<SPECIAL_72>` (renamed at release; same ids), and
  the template writes no `<s>` (Apertus added it: posttraining's `add_bos_to_chat_template`, and its example of the
  format starts `<s><SPECIAL_61>`).

`sft_messages` turns a conversation in the shapes chat.py accepts (OpenAI tool calls and `tool` messages, a
`tools` list, `enable_thinking`) into the template's input; `sft_segments` gives the (text, written_by_assistant)
pieces `chat.encode_chat(format="apertus-sft")` tokenizes and masks.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import chat_template as jt
from .chat_template import normalize_messages, normalize_tools

# SFT-time names of ids 61..72, in id order (released names: <|system_start|> ... <|tools_suffix|>).
SFT_TOKENS = tuple(f"<SPECIAL_{i}>" for i in range(61, 73))
(S_START, S_END, D_START, D_END, U_START, U_END, A_START, A_END,
 INNER, OUTER, T_START, T_END) = SFT_TOKENS
SFT_TOKEN_IDS = dict(zip(SFT_TOKENS, range(61, 73), strict=True))


def _is_sequence(x) -> bool:
    """jinja's `is sequence`: has a length and item access (strings, lists and mappings)."""
    return x is not jt.MISSING and hasattr(x, "__len__") and hasattr(x, "__getitem__")


def sft_segments(messages, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The SFT template's output as (text, written_by_assistant) pieces; joined, it is `render_sft`."""
    try:
        return _sft_segments(messages, add_generation_prompt)
    except (TypeError, KeyError, IndexError, AttributeError) as e:  # the template fails on these too
        raise ValueError(f"invalid conversation for the Apertus SFT chat format: {e!r}") from e


def _sft_segments(messages, add_generation_prompt):
    out: list[tuple[str, bool]] = []
    emit = lambda text, assistant=False: out.append((text, assistant))  # noqa: E731
    if messages and jt.get(messages[0], "role") == "system":
        content = jt.get(messages[0], "content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, Mapping) and "text" in content:
            text = jt.printed(content["text"])
        else:
            raise ValueError(f"Invalid system content: {content!r}")
        emit(S_START + text + S_END)
        rest = messages[1:]
    else:
        emit(S_START + S_END)
        rest = messages
    if rest and jt.get(rest[0], "role") == "developer":
        emit(D_START + _developer_text(jt.get(rest[0], "content")) + D_END)
        loop = rest[1:]
    else:
        emit(D_START + "Deliberation: disabled\nTool Capabilities: disabled" + D_END)
        loop = rest
    for message in loop:
        role, content = jt.get(message, "role"), jt.get(message, "content")
        if role == "user":
            if isinstance(content, str):
                text = content
            elif _is_sequence(content):
                parts = jt.get(content, "parts")
                text = "".join(jt.printed(jt.get(p, "text")) for p in ([] if parts is jt.MISSING else parts)
                               if jt.get(p, "type") == "text")
            else:
                raise ValueError(f"Invalid user content: {jt.printed(content)}")
            emit(U_START + text + U_END)
        elif role == "assistant":
            emit(A_START)
            if isinstance(content, str):
                emit(content, True)
            elif _is_sequence(content):
                _assistant_blocks(jt.get(content, "blocks"), emit)
            else:
                raise ValueError(f"Invalid assistant content: {jt.printed(content)}")
            emit(A_END, True)
        else:
            raise ValueError(f"Invalid message role: {jt.cat(role)}")
    if add_generation_prompt:
        emit(A_START)
    return out


def _developer_text(content) -> str:
    if content is jt.MISSING or not isinstance(content, (str, Mapping)):  # jinja's `in` needs a container
        raise ValueError(f"Invalid developer content: {content!r}")
    # on a string, `"has_thinking" in content` is a substring test and `content.has_thinking` is undefined
    text = "Deliberation: " + ("enabled" if jt.truthy(jt.get(content, "has_thinking")) else "disabled") + "\n" \
        if "has_thinking" in content else "Deliberation: disabled\n"
    tools = jt.get(content, "formatted_tools")
    return text + (jt.cat("Tool Capabilities:\n", tools) if "formatted_tools" in content and jt.truthy(tools)
                   else "Tool Capabilities: disabled")


def _assistant_blocks(blocks, emit):
    blocks = [] if blocks is jt.MISSING else list(blocks)
    in_inner = False
    for k, block in enumerate(blocks):
        kind = jt.get(block, "type")
        if kind == "thoughts":
            if not in_inner:
                in_inner = True
                emit(INNER, True)
            emit(jt.printed(jt.get(block, "text")), True)
        elif kind == "tool_calls":
            calls = jt.get(block, "calls")
            calls = [] if calls is jt.MISSING else calls
            if in_inner and k > 0 and len(calls) == 1 and jt.get(calls[0], "name") == "display_answers":
                in_inner = False
                emit(OUTER, True)
            emit(T_START + "[" + ", ".join(jt.cat('{"', jt.get(c, "name"), '": ', jt.get(c, "arguments"), "}")
                                           for c in calls) + "]" + T_END, True)
        elif kind == "tool_outputs":
            outputs = jt.get(block, "outputs")
            outputs = [] if outputs is jt.MISSING else outputs
            emit("[" + ", ".join(jt.printed(jt.get(o, "output")) for o in outputs) + "]" + (" " if k < len(blocks) - 1
                                                                                        else ""))
        elif kind == "response":
            if k > 0 and in_inner:
                in_inner = False
                emit(OUTER, True)
            emit(jt.printed(jt.get(block, "text")), True)
        else:
            raise ValueError(f"Invalid block type: {jt.cat(kind)}")


def render_sft(messages, add_generation_prompt: bool = False) -> str:
    """The string the SFT template renders for template-shaped messages (no `<s>`: the template writes none)."""
    return "".join(t for t, _ in sft_segments(messages, add_generation_prompt))


def sft_messages(messages, tools=None, enable_thinking: bool = False) -> list[dict]:
    """A conversation as chat.py takes it -> the SFT template's input.

    First chat.normalize_messages (a leading `developer` message becomes the system one, OpenAI content parts and
    tool-call arguments become what the templates read). Then thinking and tools become the developer message the
    SFT template reads (tools in the released template's TypeScript-like notation), and OpenAI-style tool use (an
    assistant's `tool_calls`, then `tool` messages) becomes one assistant message of blocks: its text as a response
    block, the calls as a tool_calls block, the tool messages as one tool_outputs block, as Apertus' data format
    writes a tool-using turn. Messages already in the template's shape pass through unchanged (a developer message
    with mapping content is the template's own and wins over `tools`/`enable_thinking`).
    """
    messages = list(messages)
    given = [i for i, m in enumerate(messages[:2]) if isinstance(m, Mapping) and m.get("role") == "developer"
             and isinstance(m.get("content"), Mapping)]  # the template's own developer message: kept as it is
    developer = [messages.pop(given[0])] if given else []
    messages = normalize_messages(messages)
    head = messages[:1] if messages and messages[0].get("role") == "system" else []
    messages = messages[len(head):]
    head += developer
    if (enable_thinking or tools) and not developer:
        head.append({"role": "developer", "content": {"has_thinking": bool(enable_thinking),
                                                       "formatted_tools": jt.render_tools(normalize_tools(tools))}})
    out, turn = [], []  # turn: the assistant/tool messages since the last other message
    for m in [*messages, None]:
        if m is not None and m.get("role") in ("assistant", "tool"):
            turn.append(m)
            continue
        out.extend(_merge_turn(turn))
        turn = []
        if m is not None:
            out.append(m)
    return head + out


def _merge_turn(turn: list[dict]) -> list[dict]:
    if not any(m.get("role") == "tool" or m.get("tool_calls") for m in turn):
        return turn
    blocks = []
    for m in turn:
        if m.get("role") == "tool":
            output = {"output": jt.printed(m.get("content", jt.MISSING))}  # normalize_messages made it a string
            if blocks and blocks[-1]["type"] == "tool_outputs":
                blocks[-1]["outputs"].append(output)
            else:
                blocks.append({"type": "tool_outputs", "outputs": [output]})
            continue
        content = m.get("content")
        if isinstance(content, Mapping) and isinstance(content.get("blocks"), list):
            blocks.extend(content["blocks"])
        elif isinstance(content, str) and content:
            blocks.append({"type": "response", "text": content})
        if m.get("tool_calls"):
            calls = [jt.get(c, "function") for c in m["tool_calls"]]
            blocks.append({"type": "tool_calls", "calls": [
                {"name": jt.get(c, "name"), "arguments": jt.get(c, "arguments")} for c in calls]})
    return [{"role": "assistant", "content": {"blocks": blocks}}]
