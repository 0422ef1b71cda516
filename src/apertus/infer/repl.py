"""`apertus chat` and `apertus generate`: a terminal chat on the Apertus chat format, streaming, with reasoning
shown apart from the answer; a streamed continuation.

Commands: /reset (forget the conversation), /think on|off (deliberation), /system TEXT (new system prompt, resets),
/quit. Ctrl-C stops the reply being written; Ctrl-D or /quit leaves.
"""

from __future__ import annotations

import sys

from ..chat import INNER_PREFIX, INNER_SUFFIX, encode_chat, parse_reply

HELP = "commands: /reset  /think on|off  /system TEXT  /quit"


class ReplyPrinter:
    """Writes streamed reply text, showing the reasoning span (<|inner_prefix|> ... <|inner_suffix|>) apart:
    prefixed with "[reasoning]" and dimmed on a terminal. Special tokens arrive whole (one token each), so a marker
    is never split across two pieces."""

    def __init__(self, out, color: bool):
        self.out, self.color, self.in_reasoning = out, color, False

    def write(self, text: str):
        while text:
            marker = INNER_SUFFIX if self.in_reasoning else INNER_PREFIX
            head, found, text = text.partition(marker)
            self.out.write(head)
            if found:
                self.in_reasoning = not self.in_reasoning
                if self.in_reasoning:
                    self.out.write("[reasoning] " + ("\033[2m" if self.color else ""))
                else:
                    self.out.write(("\033[0m" if self.color else "") + "\n[answer] ")
        self.out.flush()

    def close(self):
        if self.in_reasoning and self.color:
            self.out.write("\033[0m")
        self.out.write("\n")
        self.out.flush()


def chat_loop(engine, params, system: str | None = None, thinking: bool = False, read=input, out=sys.stdout):
    if engine.tokenizer is None:
        raise ValueError("chat: the model has no tokenizer.json (pass --tokenizer)")

    def fresh():
        return [{"role": "system", "content": system}] if system else []

    messages = fresh()
    out.write(f"Apertus chat ({HELP}; deliberation {'on' if thinking else 'off'})\n")
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            out.write("\n")
            return
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd == "/quit":
                return
            elif cmd == "/reset":
                messages = fresh()
                out.write("[conversation reset]\n")
            elif cmd == "/think" and arg in ("on", "off"):
                thinking = arg == "on"
                out.write(f"[deliberation {arg}]\n")
            elif cmd == "/system" and arg:
                system = arg
                messages = fresh()
                out.write("[system prompt set, conversation reset]\n")
            else:
                out.write(f"[unknown command] {HELP}\n")
            continue
        messages.append({"role": "user", "content": line})
        prompt, _ = encode_chat(engine.tokenizer, messages, enable_thinking=thinking, add_generation_prompt=True)
        handle = engine.submit(prompt, params)
        printer = ReplyPrinter(out, color=out.isatty())
        try:
            for delta in handle:
                printer.write(delta.text)
        except KeyboardInterrupt:
            handle.cancel()
            out.write(" [stopped]")
        printer.close()
        reply = parse_reply(handle.text)
        # the answer goes back into the history; the reasoning is not re-read by the model in later turns
        messages.append({"role": "assistant", "content": reply["content"] or ""})


def generate(engine, prompt: str, params, out=None, err=None) -> None:
    """`apertus generate`: stream the continuation of `prompt` to `out` (stdout), then tokens, speed and finish
    reason to `err` (stderr), so that stdout holds only the text."""
    import time

    out, err = out or sys.stdout, err or sys.stderr
    t = time.perf_counter()
    handle = engine.submit(prompt, params)
    for delta in handle:
        out.write(delta.text)
        out.flush()
    out.write("\n")
    dt = time.perf_counter() - t
    n = len(handle.output_ids)
    err.write(f"[{n} tokens in {dt:.2f}s, {n / dt:.1f} tok/s, finish: {handle.finish_reason}]\n")
