"""The OpenAI-compatible server with the official `openai` client against real uvicorn servers on 127.0.0.1.

Prompts are checked against transformers' `apply_chat_template` on the released tokenizer and template (usage
counts), replies against scripted checkpoints whose greedy output is known (see server_helpers.py), batching
against single requests, streamed text against whole replies.
"""

import asyncio
import json
import random
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import transformers
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import (
    ANSWER,
    CALL,
    MODEL,
    REPLY,
    STORY,
    STORY_PROMPT,
    THOUGHT,
    TOOL_RESULT,
    WEATHER_TOOL,
    checkpoint,
    ids,
    served,
    slow_down,
    tokenizer,
    wait_idle,
)

from apertus.chat import INNER_PREFIX, INNER_SUFFIX, TOOLS_PREFIX, TOOLS_SUFFIX, parse_reply
from apertus.infer import SamplingParams
from apertus.infer.openai_schema import ReplyParser

SYSTEM = {"role": "system", "content": "You are a test."}


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    with served(checkpoint(tmp_path_factory, "chat")) as s:
        yield s


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    with served(checkpoint(tmp_path_factory, "tools")) as s:
        yield s


@pytest.fixture(scope="module")
def random_server(tmp_path_factory):
    with served(checkpoint(tmp_path_factory, "random")) as s:
        yield s


def client(server, **kw):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


@pytest.fixture(scope="module")
def hf_tok(apertus_tokenizer_dir):
    """transformers' tokenizer with the released chat template: the reference for prompt token counts."""
    return transformers.AutoTokenizer.from_pretrained(str(apertus_tokenizer_dir))


def reference_ids(hf_tok, messages, tools=None, **kw):
    """Prompt ids by transformers on the released template, which reads flat tool specs (docs/recipe.md §1.3)."""
    kw.setdefault("add_generation_prompt", True)
    if tools:
        kw["tools"] = [t["function"] for t in tools]
    return hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)


def prompt_ids(c, **ask):
    """The prompt ids the server built for a request (vLLM's return_token_ids)."""
    extra = {**ask.pop("extra_body", {}), "return_token_ids": True}
    r = c.chat.completions.create(model=MODEL, max_tokens=1, extra_body=extra, **ask)
    return r.model_extra["prompt_token_ids"]


def metric(url, name, **labels):
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


# --- the openai client ----------------------------------------------------------------------------------------------


def test_models_list_and_retrieve(chat_server):
    c = client(chat_server)
    assert [m.id for m in c.models.list()] == [MODEL]
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")


def test_chat_plain_with_usage_counted_like_transformers(chat_server, hf_tok):
    messages = [SYSTEM, {"role": "user", "content": "Grüezi! Wie gohts?"}]
    r = client(chat_server).chat.completions.create(model=MODEL, messages=messages, temperature=0)
    choice = r.choices[0]
    assert choice.message.content == REPLY and choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert choice.message.tool_calls is None and choice.message.reasoning_content is None
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert r.usage.prompt_tokens == len(reference_ids(hf_tok, messages))
    assert r.usage.completion_tokens == len(ids(REPLY)) + 1  # + <|assistant_end|>
    assert prompt_ids(client(chat_server), messages=messages) == reference_ids(hf_tok, messages)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_chunks_and_usage(chat_server):
    messages = [SYSTEM, {"role": "user", "content": "Hi"}]
    stream = client(chat_server).chat.completions.create(model=MODEL, messages=messages, temperature=0, stream=True,
                                                         stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == REPLY and len(pieces) >= 5  # token by token
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids(REPLY)) + 1
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    # the raw stream: SSE events ending with data: [DONE]
    body = {"model": MODEL, "messages": messages, "temperature": 0, "stream": True}
    with httpx.stream("POST", chat_server[0] + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])


def test_chat_stop_strings_max_tokens_and_n(chat_server):
    c = client(chat_server)
    messages = [SYSTEM, {"role": "user", "content": "Hi"}]
    r = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, stop=[" wie", "never"])
    assert r.choices[0].message.content == "Hoi zäme" and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert r.choices[0].message.content == tokenizer().decode(ids(REPLY)[:3])
    r = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 12
    assert {ch.message.content for ch in r.choices} == {tokenizer().decode(ids(REPLY)[:4])}


def test_completions_plain_streaming_batch_and_logprobs(chat_server):
    c = client(chat_server)
    r = c.completions.create(model=MODEL, prompt=STORY_PROMPT, temperature=0, max_tokens=40)
    assert r.choices[0].text == STORY and r.choices[0].finish_reason == "stop" and r.object == "text_completion"
    assert r.usage.prompt_tokens == 1 + len(ids(STORY_PROMPT)) and r.usage.completion_tokens == len(ids(STORY)) + 1
    pieces = [ch.choices[0].text for ch in c.completions.create(model=MODEL, prompt=STORY_PROMPT, temperature=0,
                                                                 max_tokens=40, stream=True) if ch.choices]
    assert "".join(pieces) == STORY and len([p for p in pieces if p]) >= 5
    # several prompts (text and token ids) x n choices, in order
    prompt_ids = [1, *ids(STORY_PROMPT)]
    r = c.completions.create(model=MODEL, prompt=[STORY_PROMPT, "Grüezi"], temperature=0, max_tokens=3, n=2)
    assert len(r.choices) == 4 and [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == tokenizer().decode(ids(STORY)[:3])
    r = c.completions.create(model=MODEL, prompt=prompt_ids, temperature=0, max_tokens=3, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == [tokenizer().decode([t]) for t in ids(STORY)[:3]] and len(lp.top_logprobs[0]) == 2
    assert all(-0.01 < x <= 0 for x in lp.token_logprobs)  # the scripted model is sure
    assert lp.text_offset == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]


def test_tool_call_round_trip_with_a_fake_tool(tool_server, hf_tok):
    calls_made = []

    def get_weather(city):  # the fake tool
        calls_made.append(city)
        return TOOL_RESULT

    c = client(tool_server)
    messages = [SYSTEM, {"role": "user", "content": "What is the weather in Bern?"}]
    r = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning_content == THOUGHT
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Bern"}
    assert prompt_ids(c, messages=messages, tools=[WEATHER_TOOL]) == reference_ids(hf_tok, messages, [WEATHER_TOOL])
    messages.append(choice.message.model_dump(exclude_none=True, include={"role", "content", "tool_calls"}))
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": get_weather(**json.loads(call.function.arguments))})
    r = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0)
    assert r.choices[0].message.content == ANSWER and r.choices[0].finish_reason == "stop"
    assert calls_made == ["Bern"]
    # the prompt continues the assistant turn after the result, as the official template renders it
    flat = [*messages[:2], {**messages[2], "content": ""}, messages[3]]
    reference = reference_ids(hf_tok, flat, [WEATHER_TOOL], add_generation_prompt=False,
                              continue_assistant_message=True)
    assert prompt_ids(c, messages=messages, tools=[WEATHER_TOOL]) == reference
    assert tokenizer().decode(reference).endswith(TOOLS_SUFFIX + "[" + TOOL_RESULT + "]")


def test_tool_call_streaming_and_tool_choice(tool_server, hf_tok):
    c = client(tool_server)
    messages = [SYSTEM, {"role": "user", "content": "Weather?"}]
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0,
                                            stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == THOUGHT
    assert not any(d.content for d in deltas)  # the call's text is not shown as content
    [call] = [tc for d in deltas for tc in d.tool_calls or []]
    assert call.index == 0 and call.function.name == "get_weather" and json.loads(call.function.arguments) == {
        "city": "Bern"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # required: the call is started in the prompt, so there is no reasoning
    r = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0,
                                  tool_choice="required")
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert r.choices[0].message.reasoning_content is None and r.choices[0].finish_reason == "tool_calls"
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0,
                                  tool_choice=named)
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Bern"}
    # none: the model is not shown the tools
    r = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0,
                                  tool_choice="none", max_tokens=1)
    assert prompt_ids(c, messages=messages, tools=[WEATHER_TOOL], tool_choice="none") == reference_ids(hf_tok,
                                                                                                        messages)


def test_thinking_flags_render_deliberation_enabled(tool_server, hf_tok):
    c = client(tool_server)
    messages = [SYSTEM, {"role": "user", "content": "Think first."}]
    on, off = reference_ids(hf_tok, messages, enable_thinking=True), reference_ids(hf_tok, messages)
    assert "Deliberation: enabled" in tokenizer().decode(on) and on != off
    for extra, expected in (({"chat_template_kwargs": {"enable_thinking": True}}, on), ({"enable_thinking": True}, on),
                            ({"reasoning_effort": "high"}, on), ({}, off), ({"reasoning_effort": "none"}, off),
                            ({"chat_template_kwargs": {"enable_thinking": False}, "enable_thinking": True}, off)):
        assert prompt_ids(c, messages=messages, extra_body=extra) == expected, extra
    r = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, extra_body={"enable_thinking": True},
                                  max_tokens=len(ids(THOUGHT)) + 1)  # cut inside the reasoning
    assert r.choices[0].message.reasoning_content == THOUGHT and r.choices[0].message.content == ""
    assert r.choices[0].finish_reason == "length"


def test_seed_reproducibility_and_n(random_server):
    c = client(random_server)
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], "temperature": 1.5,
           "max_tokens": 16}

    def texts(**kw):
        r = c.chat.completions.create(**ask, **kw)
        return [ch.message.content for ch in r.choices]

    a = texts(seed=7)
    assert texts(seed=7) == a and texts(seed=8) != a
    many = texts(seed=7, n=3)
    assert many == texts(seed=7, n=3) and many[0] == a[0] and len(set(many)) == 3  # choice i uses seed + i


def test_logprobs_are_the_engines(random_server):
    url, engine = random_server
    messages = [{"role": "user", "content": "Logprobs, please"}]
    r = client(random_server).chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8,
                                                      logprobs=True, top_logprobs=3, presence_penalty=0.5,
                                                      frequency_penalty=1.5)
    content = r.choices[0].logprobs.content
    from apertus.chat import encode_chat

    prompt, _ = encode_chat(engine.tokenizer, messages, add_generation_prompt=True)
    [ref] = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8, logprobs=True, top_logprobs=3,
                                                     presence_penalty=0.5, frequency_penalty=1.5,
                                                     stop_token_ids=[2, 68, 72]))
    # 1e-4, as for batched vs alone (test_engine): the prompt's first pages come from the prefix cache, computed
    # for an earlier request in another batch, and the float sums differ in the last bits
    assert [e.logprob for e in content] == pytest.approx(ref.logprobs, abs=1e-4)
    assert [[t.logprob for t in e.top_logprobs] for e in content] == [
        pytest.approx([lp for _, lp in step], abs=1e-4) for step in ref.top_logprobs]
    assert max(e.logprob for e in content) > -3  # a model with opinions, not a flat distribution
    assert [e.bytes for e in content] == [list(_vocab_bytes(i)) for i in ref.output_ids]
    assert "".join(e.token for e in content) == ref.text or "\\x" in "".join(e.token for e in content)


def _vocab_bytes(token_id):
    """The bytes of a token: special tokens as their text, byte-level BPE pieces through GPT-2's byte alphabet as
    transformers defines it (a reference for the server's token_bytes)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if token_id < 1000:  # the Apertus special tokens
        return tokenizer().decode([token_id]).encode()
    table = {c: b for b, c in bytes_to_unicode().items()}
    return bytes(table[c] for c in tokenizer().inner.id_to_token(token_id))


def test_32_concurrent_streams_equal_single_requests_and_health_answers(random_server):
    url, engine = random_server
    c = client(random_server)
    prompts = [f"Request {i}: " + "word " * (i % 7) for i in range(32)]
    ask = {"model": MODEL, "temperature": 0, "max_tokens": 16}
    single = [c.chat.completions.create(messages=[{"role": "user", "content": p}], **ask).choices[0].message.content
              for p in prompts]
    steps_before = engine.stats["steps"]

    async def main():
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        done, health = asyncio.Event(), []

        async def stream(p):
            s = await ac.chat.completions.create(messages=[{"role": "user", "content": p}], stream=True, **ask)
            return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])

        async def poll():
            async with httpx.AsyncClient() as h:
                while not done.is_set():
                    health.append((await h.get(url + "/health", timeout=10)).status_code)
                    await asyncio.sleep(0.02)

        poller = asyncio.create_task(poll())
        outs = await asyncio.gather(*[stream(p) for p in prompts])
        done.set()
        await poller
        return outs, health

    outs, health = asyncio.run(main())
    assert outs == single
    assert len(health) >= 3 and set(health) == {200}
    assert engine.stats["steps"] - steps_before < 32 * 17 / 4  # they really ran as one batch


def test_disconnects_cancel_generation(random_server, monkeypatch):
    url, engine = random_server
    assert wait_idle(engine)
    slow_down(engine, monkeypatch)
    cancelled = metric(url, "apertus_generations_total", finish_reason="cancelled")
    long = {"model": MODEL, "messages": [{"role": "user", "content": "Go on forever"}], "max_tokens": 400,
            "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", url + "/v1/chat/completions", json={**long, "stream": True}) as r:
        next(r.iter_lines())
    # non-streaming: the client gives up before the reply
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=long, timeout=0.3)
    assert wait_idle(engine)
    assert metric(url, "apertus_generations_total", finish_reason="cancelled") == cancelled + 2


def test_metrics_prometheus_text(chat_server):
    url, _ = chat_server
    client(chat_server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                temperature=0)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    for name in ("apertus_http_requests", "apertus_prompt_tokens", "apertus_generation_tokens",
                 "apertus_requests_waiting", "apertus_requests_running", "apertus_time_to_first_token_seconds",
                 "apertus_generation_duration_seconds", "apertus_http_request_duration_seconds"):
        assert name in families, name
    assert metric(url, "apertus_http_requests_total", route="/v1/chat/completions", status="200") >= 1
    assert metric(url, "apertus_generation_tokens_total") >= len(ids(REPLY)) + 1
    assert metric(url, "apertus_time_to_first_token_seconds_count") >= 1
    assert httpx.get(url + "/health").json()["status"] == "ok"


# --- errors ---------------------------------------------------------------------------------------------------------


def test_errors_in_openai_shape_with_the_right_status(chat_server):
    url, engine = chat_server
    c = client(chat_server)
    user = [{"role": "user", "content": "Hi"}]
    cases = [
        (openai.NotFoundError, {"model": "gpt-4", "messages": user}, "model_not_found"),
        (openai.BadRequestError, {"model": MODEL, "messages": [{"role": "user", "content": "x " * 5000}]},
         "context_length_exceeded"),
        (openai.BadRequestError, {"model": MODEL, "messages": user, "max_tokens": 10**9}, "context_length_exceeded"),
        (openai.BadRequestError, {"model": MODEL, "messages": user, "temperature": 3}, None),
        (openai.BadRequestError, {"model": MODEL, "messages": user, "n": 0}, None),
        (openai.BadRequestError, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, None),
        (openai.BadRequestError, {"model": MODEL, "messages": [*user, {"role": "system", "content": "late"}]}, None),
        (openai.BadRequestError, {"model": MODEL, "messages": user, "tools": [
            {"type": "function", "function": {"name": "bad name!", "parameters": {"type": "object"}}}]}, None),
        (openai.BadRequestError, {"model": MODEL, "messages": user, "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                           "properties": {"a": {"type": 5}}}}}]}, None),
        (openai.BadRequestError, {"model": MODEL, "messages": user, "tool_choice": "required"}, None),
        (openai.BadRequestError, {"model": MODEL, "messages": user, "logit_bias": {"5": 150}}, None),
        (openai.UnprocessableEntityError, {"model": MODEL, "messages": user, "temperature": "hot"}, None),
        (openai.UnprocessableEntityError, {"model": MODEL, "messages": "Hi"}, None),
        (openai.UnprocessableEntityError, {"model": MODEL}, None),
    ]
    for error, body, code in cases:
        with pytest.raises(error) as e:  # the client's low-level post: it would refuse some of these bodies itself
            c.post("/chat/completions", body=body, cast_to=object)
        err = e.value.body
        assert set(err) >= {"message", "type", "param", "code"} and err["message"], body
        assert code is None or err["code"] == code, err
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model=MODEL, prompt="x " * 5000)
    for raw, status in ((b"\xff\xfe{}", 400), (b'{"model": "apertus-test", "messages": [', 400), (b"[]", 400),
                        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400),
                        (b'{"messages": [], "temperature": NaN}', 400), (b"x" * (2 << 20), 413)):
        r = httpx.post(url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == status and r.json()["error"]["message"], raw[:40]
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert wait_idle(engine)


def test_api_key(tmp_path_factory):
    with served(checkpoint(tmp_path_factory, "chat"), api_key="s3cret") as server:
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key="wrong").models.list()
        assert httpx.post(server[0] + "/v1/chat/completions", json={}).status_code == 401
        r = client(server, api_key="s3cret").chat.completions.create(model=MODEL, temperature=0,
                                                                    messages=[{"role": "user", "content": "Hi"}])
        assert r.choices[0].message.content == REPLY
        assert httpx.get(server[0] + "/health").status_code == 200  # probes need no key


def test_queue_full_is_503(tmp_path_factory):
    with served(checkpoint(tmp_path_factory, "random"), max_batch=1, max_queue=1) as server:
        engine = server[1]
        hold = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        running = engine.submit([1, 5, 6], hold)
        next(iter(running))  # it runs; the next one waits in the queue
        queued = engine.submit([1, 5, 7], hold)
        with pytest.raises(openai.InternalServerError) as e:
            client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        running.cancel()
        queued.cancel()


def test_output_filter_applies_to_streamed_and_whole_replies(tmp_path_factory):
    class Upper:  # stands in for the PII filter: feed(text) -> text to show now, flush() -> the rest
        def __init__(self):
            self.held = ""

        def feed(self, text):
            self.held += text
            out, self.held = self.held[:-2], self.held[-2:]  # holds back like a real filter
            return out.upper()

        def flush(self):
            out, self.held = self.held, ""
            return out.upper()

    with served(checkpoint(tmp_path_factory, "chat"), output_filter=Upper) as server:
        c, messages = client(server), [{"role": "user", "content": "Hi"}]
        r = c.chat.completions.create(model=MODEL, messages=messages, temperature=0)
        assert r.choices[0].message.content == REPLY.upper()
        stream = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == REPLY.upper()


# --- the reply parser and the command -------------------------------------------------------------------------------


def test_reply_parser_agrees_with_parse_reply_in_any_chunking():
    rng = random.Random(0)
    atoms = ["Hi", " there", "{", '"', INNER_PREFIX, INNER_SUFFIX, TOOLS_PREFIX + CALL, TOOLS_PREFIX + "[{oops",
             TOOLS_PREFIX + CALL + TOOLS_SUFFIX, "<|inner", "ü", "\n"]
    for _ in range(500):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 8)))
        if INNER_SUFFIX in text and parse_reply(text[:text.index(INNER_SUFFIX)])["reasoning_content"] is None:
            continue  # a suffix with no reasoning open: the documented difference (streamed content stays content)
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        parser, reasoning, content = ReplyParser(), "", ""
        for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
            r, c = parser.feed(text[a:b])
            reasoning, content = reasoning + r, content + c
        r, c = parser.finish()
        ref = parse_reply(text)
        assert (reasoning + r, content + c) == (ref["reasoning_content"] or "", ref["content"]), text
        assert [x["function"] for x in parser.calls] == [x["function"] for x in ref["tool_calls"]], text
        assert parser.saw_inner == (ref["reasoning_content"] is not None)


def test_serve_command(tmp_path_factory):
    ckpt = checkpoint(tmp_path_factory, "chat")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "apertus.cli", "serve", str(ckpt), "--port", str(port),
                             "--served-model-name", MODEL, "--cache-gb", "0.05", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, "".join(lines)
                time.sleep(0.05)
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0)
        assert r.choices[0].message.content == REPLY
    finally:
        proc.terminate()
        proc.wait(30)
    assert any(f"at http://127.0.0.1:{port}" in line for line in lines)
