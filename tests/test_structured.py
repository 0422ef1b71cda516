"""Structured outputs and logit_bias: the engine and the server (official `openai` client) on a tiny random model
with the real Apertus tokenizer. Unconstrained, the model writes multilingual noise that never parses; constrained,
every output must parse and validate against its schema (jsonschema, a validator we did not write), and tool calls
must parse with `chat.parse_calls` and fit their tool's schema."""

import json

import jsonschema
import openai
import pytest
from server_helpers import MODEL, checkpoint, served, wait_idle

from apertus.chat import TOOLS_SUFFIX, parse_calls
from apertus.infer import SamplingParams

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                         "ok": {"type": "boolean"}}}
POINT = {"type": "object", "required": ["x", "y"], "additionalProperties": False,
         "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10},
                        "y": {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^[a-z]{1,6}$"}]}}}
LIST = {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "integer", "minimum": 0, "maximum": 99}}
SCHEMAS = [PERSON, POINT, LIST]
PROMPTS = ["Describe a person as JSON:", "Hello", "Die Antwort ist", "{"]
FORECAST = {"type": "function", "function": {"name": "forecast", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city", "days", "unit"],
    "properties": {"city": {"type": "string", "maxLength": 16}, "days": {"type": "integer", "minimum": 1,
                                                                          "maximum": 7},
                   "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["a", "b"],
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "integer", "minimum": 0,
                                                                            "maximum": 9}}}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with served(checkpoint(tmp_path_factory, "random")) as s:
        yield s


def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


def parses(text):
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def check(text, schema):
    jsonschema.validate(json.loads(text), schema)


def objects(replies):
    """json_object replies: a whole object when the grammar ended it. A random model inside a free string rarely
    picks the closing quote among ~100k allowed tokens, so some replies run to max_tokens: those are cut objects (as
    OpenAI's are); at least one must be whole."""
    whole = [r for r, finish in replies if finish == "stop"]
    assert whole and all(isinstance(json.loads(r), dict) for r in whole), replies
    assert all(r.startswith("{") and not parses(r) for r, finish in replies if finish == "length"), replies


# --- the engine ------------------------------------------------------------------------------------------------------


def test_every_constrained_output_validates_where_free_output_never_parses(server):
    engine = server[1]
    free = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40))
    assert not any(parses(r.text) for r in free)  # the model by itself writes no JSON
    jobs = [(p, s, t) for p in PROMPTS for s in SCHEMAS for t in (0.0, 1.0)]
    params = [SamplingParams(temperature=t, seed=7, max_tokens=120, json_schema=s) for _, s, t in jobs]
    for (prompt, schema, t), r in zip(jobs, engine.generate([p for p, _, _ in jobs], params), strict=True):
        assert r.finish_reason == "stop", (prompt, t, r.text)  # ended by its grammar, not by max_tokens
        check(r.text, schema)
    replies = engine.generate(PROMPTS, SamplingParams(temperature=0.8, seed=1, max_tokens=60,
                                                      json_schema={"type": "object"}))
    objects([(r.text, r.finish_reason) for r in replies])


def test_unconstrained_requests_batched_with_constrained_ones_are_unchanged(server):
    engine = server[1]
    for free in (SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                 SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True)):
        [alone] = engine.generate(["Hello"], free)
        mixed = engine.generate(["Describe a person as JSON:", "Hello", "{"],
                                [SamplingParams(temperature=0, max_tokens=80, json_schema=PERSON), free,
                                 SamplingParams(temperature=1.0, seed=5, max_tokens=80, json_schema=POINT)])
        assert mixed[1].output_ids == alone.output_ids
        check(mixed[0].text, PERSON)
        check(mixed[2].text, POINT)


def test_lark_grammar_and_bad_grammars(server):
    engine = server[1]
    [r] = engine.generate(["Hello"], SamplingParams(temperature=1.0, seed=2, max_tokens=30,
                                                    grammar='start: ("yes" | "no") ("!" | ".")'))
    assert r.text in {"yes!", "yes.", "no!", "no."} and r.finish_reason == "stop"
    with pytest.raises(ValueError, match="grammar"):
        engine.submit("Hello", SamplingParams(grammar="start: undefined_rule"))
    with pytest.raises(ValueError, match="JSON schema"):
        engine.submit("Hello", SamplingParams(json_schema={"type": "string", "format": "no-such-format"}))


# --- the server ------------------------------------------------------------------------------------------------------


def test_chat_json_schema_and_json_object_streamed_and_whole(server):
    c = client(server)
    for schema in SCHEMAS:
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
        for temperature in (0, 1.0):
            kw = dict(model=MODEL, messages=[{"role": "user", "content": "Give me JSON"}], response_format=fmt,
                      temperature=temperature, seed=11, max_tokens=150)
            whole = c.chat.completions.create(**kw)
            text = whole.choices[0].message.content
            check(text, schema)
            assert whole.choices[0].finish_reason == "stop"
            chunks = list(c.chat.completions.create(**kw, stream=True))
            streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            assert streamed == text  # seeded: the same reply
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please"}], n=4,
                                  response_format={"type": "json_object"}, temperature=1.0, seed=4, max_tokens=60)
    objects([(ch.message.content, ch.finish_reason) for ch in r.choices])
    free = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Give me JSON"}],
                                     temperature=0, max_tokens=40)
    assert not parses(free.choices[0].message.content)
    assert wait_idle(server[1])


def test_completions_response_format_streamed_and_whole(server):
    c = client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "point", "schema": POINT}}
    r = c.completions.create(model=MODEL, prompt=["Hello", "Once upon a time"], max_tokens=100, temperature=0.9,
                             seed=2, extra_body={"response_format": fmt})
    for choice in r.choices:
        check(choice.text, POINT)
    stream = c.completions.create(model=MODEL, prompt="Hello", max_tokens=100, temperature=0.9, seed=2, stream=True,
                                  extra_body={"response_format": fmt})
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == r.choices[0].text


def test_forced_tool_calls_follow_the_declared_schemas(server):
    c = client(server)
    tools = [FORECAST, ADD]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    messages = [{"role": "user", "content": "What is the weather in Bern?"}]
    choices = [("required", None), ({"type": "function", "function": {"name": "add"}}, "add"),
               ({"type": "function", "function": {"name": "forecast"}}, "forecast")]
    for choice, name in choices:
        for stream in (False, True):
            kw = dict(model=MODEL, messages=messages, tools=tools, tool_choice=choice, temperature=1.0, seed=9,
                      max_tokens=150, extra_body={"return_token_ids": True})
            if stream:
                chunks = list(c.chat.completions.create(**{**kw, "stream": True}))
                calls = [t for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls or []]
                finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
            else:
                r = c.chat.completions.create(**kw)
                calls, finish = r.choices[0].message.tool_calls, [r.choices[0].finish_reason]
                raw = server[1].tokenizer.decode(r.choices[0].model_extra["token_ids"], skip_special_tokens=False)
                prefix = "[{" + json.dumps(name) + ":" if name else ""  # what the prompt forced
                assert raw.endswith(TOOLS_SUFFIX) and parse_calls(prefix + raw.removesuffix(TOOLS_SUFFIX))
            assert finish == ["tool_calls"] and calls, (choice, stream)
            for call in calls:
                assert call.function.name == (name or call.function.name) and call.function.name in schemas
                jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_logit_bias_through_both_endpoints(server):
    c = client(server)
    tok = server[1].tokenizer
    token = tok.encode(" Bern", bos=False)[0]
    for temperature in (0, 1.0):
        r = c.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=temperature, seed=1,
                                 logit_bias={str(token): 100}, extra_body={"return_token_ids": True})
        assert r.choices[0].model_extra["token_ids"] == [token] * 5
        m = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                      temperature=temperature, seed=1, logit_bias={str(token): 100})
        assert m.choices[0].message.content == " Bern" * 3
        free = c.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=temperature, seed=1,
                                    extra_body={"return_token_ids": True}).choices[0].model_extra["token_ids"]
        banned = c.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=temperature, seed=1,
                                      logit_bias={str(t): -100 for t in free},
                                      extra_body={"return_token_ids": True}).choices[0].model_extra["token_ids"]
        assert not set(banned) & set(free)


def test_bad_logit_bias_and_response_format_are_400(server):
    c = client(server)
    user = [{"role": "user", "content": "Hi"}]
    bad = [{"logit_bias": {"5": 150}}, {"logit_bias": {"-1": 5}}, {"logit_bias": {"x": 5}},
           {"logit_bias": {str(10**9): 5}}, {"response_format": {"type": "yaml"}},
           {"response_format": {"type": "json_schema"}},
           {"response_format": {"type": "json_schema", "json_schema": {"name": "bad name", "schema": {}}}},
           {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": 5}}}},
           {"response_format": {"type": "json_object"}, "tools": [ADD], "tool_choice": "required"}]
    for extra in bad:
        with pytest.raises(openai.BadRequestError) as e:
            c.post("/chat/completions", body={"model": MODEL, "messages": user, **extra}, cast_to=object)
        assert e.value.body["param"].split(".")[0] in {"logit_bias", "response_format"}, (extra, e.value.body)
        if "tools" not in extra:  # /v1/completions has no tools
            with pytest.raises(openai.BadRequestError):
                c.post("/completions", body={"model": MODEL, "prompt": "Hi", **extra}, cast_to=object)
    # uniqueItems is a keyword llguidance cannot enforce: a 400 when strict, ignored (the rest enforced) when not
    unique = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3,
              "uniqueItems": True}
    for strict in (True, False):
        fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": unique, "strict": strict}}
        kw = dict(model=MODEL, messages=user, response_format=fmt, max_tokens=60, temperature=0)
        if strict:
            with pytest.raises(openai.BadRequestError, match="uniqueItems"):
                c.chat.completions.create(**kw)
        else:
            reply = json.loads(c.chat.completions.create(**kw).choices[0].message.content)
            jsonschema.validate(reply, {**unique, "uniqueItems": False})
