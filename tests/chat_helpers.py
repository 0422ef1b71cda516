"""Builders of assistant messages in the Apertus block shape, shared by the tests of both chat formats."""

import json


def blocks(*bs):
    return {"role": "assistant", "content": {"blocks": list(bs)}}


def th(text):
    return {"type": "thoughts", "text": text}


def resp(text):
    return {"type": "response", "text": text}


def tcalls(*calls):
    return {"type": "tool_calls", "calls": [{"name": n, "arguments": json.dumps(a)} for n, a in calls]}


def touts(*outs):
    return {"type": "tool_outputs", "outputs": [{"output": json.dumps(o)} for o in outs]}
