"""Hostile requests against a real server: malformed bodies, wrong types, huge and negative numbers, giant bodies,
invalid UTF-8, unknown fields, clients that leave mid-stream or mid-body. Never a 500, never a crash, nothing left
running in the engine, and the server answers a valid request the same way afterwards."""

import copy
import json
import random
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_helpers import MODEL, WEATHER_TOOL, checkpoint, served, wait_idle

LIMIT = 64 << 10  # the body limit of the fuzzed server
OK = {200, 400, 404, 405, 413, 422}

CHAT = {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "seed": 1, "n": 1, "stop": ["\n\n"], "logprobs": False,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "tools": [WEATHER_TOOL], "tool_choice": "auto",
        "stream": False}
COMPLETION = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0.7, "n": 1,
              "logprobs": 2, "stop": "x", "seed": 3, "stream": False}

HOSTILE = [None, True, False, 0, -1, 1, 2, 3.5, -0.0, 2**31, 2**63, 2**64, 10**30, -10**30, 1e308, -1e308, 1e-308,
           "", "0.5", "x" * 3000, "🦀" * 50, "\x00", "<|assistant_end|>", "<script>alert(1)</script>", [], [1],
           ["a"] * 40, [[[[[]]]]], {}, {"a": {"b": [1, {"c": None}]}}, {"type": "function"}, [{"role": "user"}],
           [{"role": "user", "content": None}], [{"role": "tool", "content": "x"}], "required", "none", "gpt-4"]
PATHS = [("model",), ("messages",), ("messages", 0), ("messages", 1, "role"), ("messages", 1, "content"),
         ("messages", 1, "content", 0), ("max_tokens",), ("max_completion_tokens",), ("temperature",), ("top_p",),
         ("seed",), ("n",), ("stop",), ("stop", 0), ("logprobs",), ("top_logprobs",), ("presence_penalty",),
         ("frequency_penalty",), ("tools",), ("tools", 0, "function", "name"), ("tools", 0, "function", "parameters"),
         ("tools", 0, "function", "parameters", "properties"), ("tool_choice",), ("stream_options",),
         ("response_format",), ("logit_bias",), ("chat_template_kwargs",), ("enable_thinking",), ("top_k",),
         ("min_p",), ("repetition_penalty",), ("unknown_field",), ("stream",), ("reasoning_effort",),
         ("continue_final_message",), ("prompt",), ("echo",), ("best_of",), ("suffix",)]


def _kind(x):
    return "number" if isinstance(x, (int, float)) and not isinstance(x, bool) else type(x).__name__


def mutate(base: dict, rng: random.Random) -> dict:
    """Replace 1-3 fields (or nested items) with hostile values; half the time of the same JSON type (so values,
    not only types, get tested)."""
    body = copy.deepcopy(base)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(PATHS)
        current = body.get(path[0]) if len(path) == 1 else None
        same = [v for v in HOSTILE if _kind(v) == _kind(current)] if current is not None else []
        value = copy.deepcopy(rng.choice(same if same and rng.random() < 0.5 else HOSTILE))
        node = body
        for key in path[:-1]:
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and isinstance(key, int) and key < len(node):
                node = node[key]
            else:
                break
        else:
            if isinstance(node, dict) or (isinstance(node, list) and path[-1] < len(node)):
                node[path[-1]] = value
    if body.get("stream") is True:
        body["stream"] = False  # streams are fuzzed separately (with disconnects)
    if isinstance(body.get("n"), int) and not isinstance(body["n"], bool) and body["n"] > 4:
        body["n"] = 4  # keep a valid big n from making the test slow; n > 16 is checked elsewhere
    return body


def raw_bodies(rng: random.Random):
    valid = json.dumps(CHAT).encode()
    yield b""
    yield b"null"
    yield b"[]"
    yield b'"just a string"'
    yield b"{"
    yield b'{"model": "apertus-test", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1e999}'
    yield b'{"max_tokens": NaN}'
    yield b'{"temperature": Infinity}'
    yield b'{"max_tokens": ' + b"9" * 5000 + b"}"  # more digits than Python parses
    yield b"[" * 30000 + b"]" * 30000  # nesting
    yield b'{"a":' * 5000 + b"1" + b"}" * 5000
    for depth in (100, 300, 450):  # deep tool schemas: JSON parses, the schema check and the renderer recurse
        schema = {"type": "string"}
        for _ in range(depth):
            schema = {"type": "object", "properties": {"a": schema}}
        yield json.dumps({**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]},
                         separators=(",", ":")).encode()
    yield json.dumps({**CHAT, "messages": [{"role": "user", "content": "\\ud800"}]}).encode().replace(b"\\\\", b"\\")
    yield valid.replace(b"Hi", b"H\xffi")  # invalid UTF-8
    yield valid.replace(b"Hi", b"H\xc3")
    yield b"\xef\xbb\xbf" + valid  # BOM
    yield json.dumps(CHAT).encode("utf-16")
    yield b"x" * (LIMIT + 1)  # giant bodies
    yield b" " * (4 * LIMIT)
    yield json.dumps({**CHAT, "messages": [{"role": "user", "content": "y" * (3 * LIMIT)}]}).encode()
    for _ in range(20):
        cut = rng.randint(1, len(valid) - 1)
        yield valid[:cut]  # truncated
        yield bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))  # noise


def check(r: httpx.Response, what):
    assert r.status_code in OK, (r.status_code, r.text[:300], what)
    body = r.json()
    if r.status_code == 200:
        assert "choices" in body or "data" in body, what
    else:
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], what


def stream_and_leave(url, body, lines: int):
    """Start a stream, read a few events, then close the connection."""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code in OK, r.status_code
        if r.status_code != 200:
            return r.read()
        for k, line in enumerate(r.iter_lines()):
            if line:
                assert line.startswith("data: ") and (line == "data: [DONE]" or json.loads(line[6:]))
            if k >= lines:
                break


def half_body_and_leave(url):
    """Announce a body, send part of it and hang up."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 5000\r\n\r\n" + json.dumps(CHAT).encode()[:50])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with served(checkpoint(tmp_path_factory, "random"), max_body_bytes=LIMIT) as s:
        yield s


def test_fuzz_no_500_no_crash_and_still_serving(server):
    url, engine = server
    rng = random.Random(1234)
    valid = {**CHAT, "temperature": 0, "max_tokens": 8, "tools": None, "tool_choice": None}
    before = httpx.post(url + "/v1/chat/completions", json=valid).json()["choices"][0]["message"]

    cases = [("raw", b) for b in raw_bodies(rng)]
    cases += [("json", mutate(rng.choice([CHAT, CHAT, COMPLETION]), rng)) for _ in range(160)]
    cases += [("stream", ({**CHAT, "stream": True, "max_tokens": rng.randint(20, 300), "ignore_eos": True,
                           "n": rng.randint(1, 3)}, rng.randint(0, 4))) for _ in range(12)]
    cases += [("half", None)] * 4 + [("get", "/v1/chat/completions"), ("get", "/v1/nothing/../../etc/passwd"),
                                     ("get", "/static/../server.py"), ("delete", "/v1/models")]
    assert len(cases) >= 200

    def run(case):
        kind, payload = case
        path = "/v1/completions" if isinstance(payload, dict) and "prompt" in payload else "/v1/chat/completions"
        if kind == "raw":
            check(httpx.post(url + path, content=payload, headers={"content-type": "application/json"}, timeout=60),
                  payload[:80])
        elif kind == "json":
            check(httpx.post(url + path, json=payload, timeout=60), payload)
        elif kind == "stream":
            stream_and_leave(url, *payload)
        elif kind == "half":
            half_body_and_leave(url)
        else:
            r = httpx.request(kind.upper(), url + payload, timeout=10)
            assert r.status_code in {404, 405} and "error" in r.json(), payload

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(run, cases))

    # nothing left running (disconnected streams were cancelled), no 500 recorded, same answer as before
    assert wait_idle(engine)
    metrics = httpx.get(url + "/metrics").text
    assert 'status="500"' not in metrics and 'finish_reason="error"' not in metrics
    assert 'finish_reason="cancelled"' in metrics
    assert httpx.get(url + "/health").json()["status"] == "ok"
    after = httpx.post(url + "/v1/chat/completions", json=valid).json()["choices"][0]["message"]
    assert after == before
