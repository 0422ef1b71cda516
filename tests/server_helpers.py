"""Checkpoints and servers for the server tests (tests/test_server*.py).

A tiny random model will not answer with a tool call by itself, so the tests that need a known reply use
*scripted* checkpoints: real Apertus models with the real tokenizer whose greedy output is fixed by their weights.
Attention and MLP outputs are zeroed, so the last hidden state is the (normed) embedding of the last token; each
token of a chain gets a random unit embedding u and the lm_head row of its successor gets 50·u, so the model
predicts the successor with near certainty (a bigram table in the weights). The server, engine, tokenizer and chat
format run unchanged; only the weights are crafted. A token may have one successor, so the helper checks that the
chains share no token. Random checkpoints (matrices normal(0, 0.2), lm_head normal(0, 1): peaked distributions)
cover everything that must not depend on the reply (batching, seeds, log-probabilities, fuzzing).
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch

from apertus import ApertusConfig, build_model, save_model
from apertus.infer import Engine
from apertus.infer.server import create_app, running
from apertus.tokenizer import Tokenizer, apertus_tokenizer_path

TOKENIZER_JSON = apertus_tokenizer_path()  # rebuilt from mistral-common once per machine (cached)
MODEL = "apertus-test"
ASSISTANT_START, ASSISTANT_END, INNER_PREFIX, INNER_SUFFIX, TOOLS_PREFIX, TOOLS_SUFFIX, EOS = 67, 68, 69, 70, 71, 72, 2

REPLY = "Hoi zäme wie gohts"  # the chat model's answer to anything
STORY_PROMPT, STORY = "Once upon a time", " there was a small model that wrote stories"
THOUGHT = "Let me check the weather"  # the tool model's reasoning before its call
CALL = '[{"get_weather": {"city":"Bern"}}]'
TOOL_RESULT = '{"temp": 20}'  # what the tests' fake get_weather returns
ANSWER = "It is 20 degrees in Bern."  # the tool model's reply once the result is in the prompt

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}


@functools.lru_cache(maxsize=1)
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(TOKENIZER_JSON)


def ids(text: str) -> list[int]:
    return tokenizer().encode(text, bos=False)


def chains(kind: str) -> list[list[int]]:
    """The scripted replies: 'chat' answers REPLY after <|assistant_start|> and continues STORY_PROMPT with STORY;
    'tools' reasons, then calls get_weather, and answers ANSWER after the tool result `[{"temp": 20}]`."""
    if kind == "chat":
        return [[ASSISTANT_START, *ids(REPLY), ASSISTANT_END], [ids(STORY_PROMPT)[-1], *ids(STORY), EOS]]
    result_end = ids("[" + TOOL_RESULT + "]")[-1]
    return [[ASSISTANT_START, INNER_PREFIX, *ids(THOUGHT), INNER_SUFFIX, TOOLS_PREFIX, *ids(CALL), TOOLS_SUFFIX],
            [result_end, *ids(ANSWER), ASSISTANT_END]]


def scripted_checkpoint(path, kind: str, context: int = 4096):
    cfg = ApertusConfig(vocab_size=131072, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=context)
    model = build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    heads = [t for chain in chains(kind) for t in chain[:-1]]
    assert len(set(heads)) == len(heads), "a token may predict only one successor"
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        for chain in chains(kind):
            for a, b in zip(chain[:-1], chain[1:], strict=True):
                u = torch.randn(64, generator=g)
                model.model.embed_tokens.weight[a] = u / u.norm()
                model.lm_head.weight[b] += 50 * u / u.norm()
    save_model(model, path, instruct=True, extra_files={"tokenizer.json": TOKENIZER_JSON.read_text()})
    return path


def random_checkpoint(path, context: int = 512, seed: int = 0):
    cfg = ApertusConfig(vocab_size=131072, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context)
    model = build_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # far from init, with peaked next-token distributions (clear greedy choices)
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if name == "lm_head.weight" else 0.2))
    save_model(model, path, instruct=True, extra_files={"tokenizer.json": TOKENIZER_JSON.read_text()})
    return path


def checkpoint(tmp_path_factory, kind: str):
    """A checkpoint shared by all test files of the session ('chat', 'tools' or 'random')."""
    path = tmp_path_factory.getbasetemp() / f"server-{kind}"
    if not (path / "config.json").exists():
        random_checkpoint(path) if kind == "random" else scripted_checkpoint(path, kind)
    return path


@contextlib.contextmanager
def served(path, api_key=None, max_body_bytes=1 << 20, output_filter=None, **engine_kw):
    """(base URL, engine) of a real uvicorn server on 127.0.0.1 (a free port) serving the checkpoint."""
    engine_kw = {"cache_gb": 0.05, "max_batch": 32, **engine_kw}
    with Engine(path, **engine_kw) as engine:
        app = create_app(engine, MODEL, api_key=api_key, max_body_bytes=max_body_bytes, output_filter=output_filter)
        with running(app) as url:
            yield url, engine


def slow_down(engine, monkeypatch, seconds=0.005):
    """Each forward of the engine takes a few ms more: a long generation is still running when a client leaves, and
    a browser sees tokens arrive one by one."""
    real = engine.model.hidden_states

    def slow(*a, **k):
        time.sleep(seconds)
        return real(*a, **k)

    monkeypatch.setattr(engine.model, "hidden_states", slow)


def wait_idle(engine, timeout=30):
    """Until the engine holds no request and every cache page is free (what a cancel must lead to)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not engine._running and not engine._waiting and engine.cache.n_free == engine.cache.n_pages:
            return True
        time.sleep(0.02)
    return False
