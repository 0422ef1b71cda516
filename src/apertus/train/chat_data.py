"""Chat data for post-training: conversations from JSONL, tokenised with the Apertus chat format and checked.

A source is a table `{format, path, limit, skip, system}` (recipes list them under `[data] sources`); `system`
puts a system message before conversations that have none (else the template's default one is rendered):

    chat    JSONL, one conversation a line: {"messages": [...], "tools": [...]?, "enable_thinking": bool?}.
            Messages in the OpenAI shape (tool_calls, role "tool") or the Apertus one (content {"blocks": [...]});
            an assistant message's `reasoning_content` (or `reasoning`) becomes a thoughts block (deliberation on).
    gsm8k   {"question", "answer"}: user = question, assistant = answer with the `<<48/2=24>>` calculator notes
            removed; the final `#### N` line is kept (meta: answer = N, for rewards).
    dolly   {"text": "### Human: ... ### Assistant: ..."} (the dolly_open_qa file).
    orca    {"input": {"messages"}, "preferred_output", "non_preferred_output"}: the chosen side as the
            assistant turn (meta: rejected = the other answer, an offline candidate for alignment).

Every conversation yields {"messages", "tools", "enable_thinking", "meta"}. `encode` checks one for training and
returns the token ids and the mask of assistant-written tokens, or the reason it is skipped (counted in the run log).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

FORMATS = ("chat", "gsm8k", "dolly", "orca")
SKIP_REASONS = ("invalid", "no_final_assistant_turn", "empty_completion", "too_long")
_CALC = re.compile(r"<<[^<>]*>>")
GSM8K_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        from ..config import data_root

        for candidate in (data_root() / p, data_root().parent / p):  # "gsm8k/train.jsonl", "data/gsm8k/..."
            if candidate.exists():
                return candidate
        corpus = p.parts[1] if p.parts[0] == "data" and len(p.parts) > 1 else p.parts[0]
        raise FileNotFoundError(f"{path}: chat data file not found (as given, or in {data_root()}); if it is part of "
                                f"the data set '{corpus}', run `apertus data fetch {corpus}`")
    return p


def _jsonl(path: Path) -> Iterator[tuple[int, dict | None]]:
    opener = __import__("gzip").open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                yield n, row if isinstance(row, dict) else None


def gsm8k_answer(text: str) -> str | None:
    """The number of a `#### N` final line (commas dropped), or None."""
    m = GSM8K_FINAL.search(text.strip())
    return m.group(1).replace(",", "") if m else None


def _reasoning_to_blocks(messages: list) -> tuple[list, bool]:
    """OpenAI-style `reasoning_content` → Apertus blocks. All assistant messages of a conversation must share one
    format (the template's rule), so when one has reasoning, every string assistant message becomes blocks."""
    key = lambda m: m.get("reasoning_content") or m.get("reasoning")  # noqa: E731
    if not any(isinstance(m, dict) and m.get("role") == "assistant" and isinstance(key(m), str) for m in messages):
        return messages, False
    out = []
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "assistant" and not isinstance(m.get("content"), dict):
            m = dict(m)
            thoughts, text = m.pop("reasoning_content", None) or m.pop("reasoning", None), m.get("content") or ""
            m.pop("reasoning", None)
            blocks = ([{"type": "thoughts", "text": thoughts}] if thoughts else []) + (
                [{"type": "response", "text": text}] if text else [])
            m["content"] = {"blocks": blocks}
        out.append(m)
    return out, True


def _convert(fmt: str, row: dict) -> dict:
    if fmt == "chat":
        messages, thinking = _reasoning_to_blocks(row["messages"])
        return {"messages": messages, "tools": row.get("tools"),
                "enable_thinking": bool(row.get("enable_thinking", thinking)), "meta": row.get("meta") or {}}
    if fmt == "gsm8k":
        answer = _CALC.sub("", row["answer"])
        return {"messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": answer}],
                "meta": {"answer": gsm8k_answer(answer)}}
    if fmt == "dolly":
        human, sep, assistant = row["text"].partition(" ### Assistant: ")
        if not sep:
            raise KeyError("no ' ### Assistant: ' in text")
        return {"messages": [{"role": "user", "content": human.removeprefix("### Human: ").strip()},
                             {"role": "assistant", "content": assistant.strip()}]}
    if fmt == "orca":
        rejected = [m.get("content") for m in row.get("non_preferred_output") or []]
        return {"messages": list(row["input"]["messages"]) + list(row["preferred_output"]),
                "meta": {"rejected": rejected[-1] if rejected else None}}
    raise ValueError(f"chat data: unknown format {fmt!r} (one of {', '.join(FORMATS)})")


def read_source(source: dict) -> Iterator[dict]:
    """The conversations of one source (`limit` after `skip`); rows that are not a conversation of the format yield
    {"error": ...} (the caller counts them as invalid)."""
    fmt, path = source.get("format", "chat"), source.get("path")
    if fmt not in FORMATS:
        raise ValueError(f"chat data: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if not path:
        raise ValueError(f"chat data: source {source} has no path")
    unknown = sorted(set(source) - {"format", "path", "limit", "skip", "system"})
    if unknown:
        raise ValueError(f"chat data: source {path}: unknown key(s) {', '.join(unknown)} "
                         "(format, path, limit, skip, system)")
    system = source.get("system")
    skip, limit = int(source.get("skip", 0)), source.get("limit")
    file = _resolve(path)
    taken = 0
    for n, row in _jsonl(file):
        if n <= skip:
            continue
        if limit is not None and taken >= int(limit):
            return
        taken += 1
        try:
            if row is None:
                raise ValueError("not a JSON object")
            conv = _convert(fmt, row)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            yield {"error": f"{file}:{n}: {e!r}"}
            continue
        if system and not (conv["messages"] and isinstance(conv["messages"][0], dict)
                           and conv["messages"][0].get("role") in ("system", "developer")):
            conv["messages"] = [{"role": "system", "content": system}, *conv["messages"]]
        conv.setdefault("tools", None)
        conv.setdefault("enable_thinking", False)
        conv.setdefault("meta", {})
        yield conv


def read_sources(sources: list[dict]) -> list[dict]:
    return [c for s in sources for c in read_source(s)]


def _final_turn_problem(messages) -> str | None:
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return "invalid"
    last = messages[-1]
    if last.get("role") != "assistant":
        return "no_final_assistant_turn"
    content = last.get("content")
    if isinstance(content, dict):
        content = "".join(str(b.get("text", "")) + str(b.get("calls", "")) for b in content.get("blocks") or []
                          if isinstance(b, dict))
    if not (content or "").strip() and not last.get("tool_calls"):
        return "empty_completion"
    return None


def encode(tokenizer, conv: dict, max_len: int, date=None,
           format: str = "apertus-sft") -> tuple[list[int], list[bool]] | str:
    """(ids, assistant mask) of a conversation for SFT, or the reason it is skipped (one of SKIP_REASONS).

    `format` is the chat format (chat.encode_chat): "apertus-sft", the template Apertus was fine-tuned with (the
    default), or "release", the released template inference uses; `date` fills the latter's default system prompt.
    """
    from ..chat import CHAT_FORMATS, encode_chat

    if format not in CHAT_FORMATS:  # checked here: encode_chat's ValueError would count every row as invalid
        raise ValueError(f"chat data: unknown chat format {format!r} (one of {', '.join(CHAT_FORMATS)})")
    if "error" in conv:
        return "invalid"
    problem = _final_turn_problem(conv["messages"])
    if problem:
        return problem
    try:
        ids, mask = encode_chat(tokenizer, conv["messages"], tools=conv["tools"],
                                enable_thinking=conv["enable_thinking"], date=date, format=format)
    except ValueError:
        return "invalid"
    if not any(mask):
        return "empty_completion"
    if len(ids) > max_len:
        return "too_long"
    return ids, mask


def prompt_of(conv: dict) -> tuple[list, str | None]:
    """(the messages up to the last user turn, the final assistant text if there was one) for alignment prompts."""
    messages = list(conv["messages"])
    answer = None
    while messages and messages[-1].get("role") == "assistant":
        content = messages.pop().get("content")
        answer = content if isinstance(content, str) and answer is None else answer
    return messages, answer
