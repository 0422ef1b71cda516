"""Prefix caching as the server's clients see it, through the official openai client: `usage.prompt_tokens_details.
cached_tokens` (whole and streamed answers, both endpoints), the same replies as a server without it, the /metrics
hit-rate counters, and `apertus serve --no-prefix-caching`."""

import openai
import pytest
from server_helpers import MODEL, checkpoint, served
from test_server import metric

from apertus.cli import build_parser

PAGE = 16
SYSTEM = {"role": "system", "content": "You are a careful assistant for the Swiss public administration. " * 12}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A random model served with prefix caching (the default) and without."""
    path = checkpoint(tmp_path_factory, "random")
    with served(path) as on, served(path, prefix_caching=False) as off:
        yield on, off


def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


def chat(server, messages, **kw):
    return client(server).chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8, **kw)


def full_pages(n_tokens: int) -> int:
    """Prompt tokens a repeated prompt finds cached: its full pages, one token short of the end."""
    return (n_tokens - 1) // PAGE * PAGE


def test_chat_reports_cached_tokens_and_answers_as_without(servers):
    on, off = servers
    turn1 = [SYSTEM, {"role": "user", "content": "Grüezi! Wie gohts?"}]
    first, again, ref = chat(on, turn1), chat(on, turn1), chat(off, turn1)
    n = first.usage.prompt_tokens
    assert n > 100 and first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == full_pages(n)
    assert ref.usage.prompt_tokens_details.cached_tokens == 0
    assert first.choices[0].message.content == again.choices[0].message.content == ref.choices[0].message.content
    turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content or "Guet."},
                     {"role": "user", "content": "Und dir?"}]
    second, ref2 = chat(on, turn2), chat(off, turn2)
    assert second.usage.prompt_tokens_details.cached_tokens >= full_pages(n) - PAGE  # the history, at least
    assert second.choices[0].message.content == ref2.choices[0].message.content
    stream = chat(on, turn2, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == second.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == full_pages(second.usage.prompt_tokens)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == second.choices[0].message.content


def test_completions_count_each_prompt_once(servers):
    on, off = servers
    prompts = ["Es war einmal ein kleines Modell, " * 8 + "das", "Es war einmal ein kleines Modell, " * 8 + "und"]
    c = client(on)
    first = c.completions.create(model=MODEL, prompt=prompts, n=2, temperature=0, max_tokens=6)
    second = c.completions.create(model=MODEL, prompt=prompts, n=2, temperature=0, max_tokens=6)
    n = first.usage.prompt_tokens // 2  # both prompts have the same length
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens  # their shared start at most
    assert second.usage.prompt_tokens_details.cached_tokens == 2 * full_pages(n)
    ref = client(off).completions.create(model=MODEL, prompt=prompts, n=2, temperature=0, max_tokens=6)
    assert [ch.text for ch in second.choices] == [ch.text for ch in ref.choices]
    stream = c.completions.create(model=MODEL, prompt=prompts[0], temperature=0, max_tokens=6, stream=True,
                                  stream_options={"include_usage": True})
    last = list(stream)[-1]
    assert last.choices == [] and last.usage.prompt_tokens_details.cached_tokens == full_pages(n)


def test_metrics_count_queried_and_hit_prompt_tokens(servers):
    on, off = servers
    url = on[0]
    before = (metric(url, "apertus_prefix_cache_queries_total"), metric(url, "apertus_prefix_cache_hits_total"))
    messages = [SYSTEM, {"role": "user", "content": "Was ist ein Prefix-Cache?"}]
    rs = [chat(on, messages) for _ in range(3)]
    queried = metric(url, "apertus_prefix_cache_queries_total") - before[0]
    hits = metric(url, "apertus_prefix_cache_hits_total") - before[1]
    assert queried == sum(r.usage.prompt_tokens for r in rs)
    assert hits == sum(r.usage.prompt_tokens_details.cached_tokens for r in rs) >= 2 * full_pages(
        rs[0].usage.prompt_tokens)
    chat(off, messages)
    assert metric(off[0], "apertus_prefix_cache_hits_total") == 0 < metric(off[0], "apertus_prefix_cache_queries_total")


def test_serve_flag_turns_it_off():
    parser = build_parser()
    assert parser.parse_args(["serve", "ckpt"]).prefix_caching is True
    assert parser.parse_args(["serve", "ckpt", "--no-prefix-caching"]).prefix_caching is False
