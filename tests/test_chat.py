"""The chat format against the official template (jinja2 and transformers' apply_chat_template) and the real ids."""

import copy
import datetime
import json
import random

import jinja2
import jinja2.ext
import pytest
from chat_helpers import blocks, resp, tcalls, th, touts
from jinja2.sandbox import ImmutableSandboxedEnvironment

from apertus.chat import STOP_IDS, encode_chat, normalize_messages, normalize_tools, parse_reply, render
from apertus.tokenizer import Tokenizer

DATE = datetime.datetime(2025, 9, 2, 10, 30)


@pytest.fixture(scope="module")
def template_dir(apertus_tokenizer_dir):
    return apertus_tokenizer_dir  # templates, tokenizer_config.json and tokenizer.json: as the model ships them


@pytest.fixture(scope="module")
def official(template_dir):
    """The released template as transformers runs it (trim/lstrip blocks, json.dumps tojson), fixed date."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: DATE.strftime(fmt)
    templates = {name: env.from_string((template_dir / name).read_text())
                 for name in ("chat_template.jinja", "chat_template_llamacpp.jinja")}

    def run(messages, tools=None, name="chat_template.jinja", **kw):
        return templates[name].render(messages=messages, tools=tools, bos_token="<s>", eos_token="<|assistant_end|>",
                                      **kw)

    return run


@pytest.fixture(scope="module")
def hf_tokenizer(template_dir):
    """transformers' tokenizer from the released files, with strftime_now pinned to DATE."""
    transformers = pytest.importorskip("transformers")
    import transformers.utils.chat_template_utils as ctu

    class Fixed(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return DATE

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ctu, "datetime", Fixed)
        yield transformers.AutoTokenizer.from_pretrained(str(template_dir))


@pytest.fixture(scope="module")
def tok(apertus_tokenizer_json):
    return Tokenizer.from_file(apertus_tokenizer_json)


# --- conversations ---------------------------------------------------------------------------------------------------

WEATHER = {"name": "get_weather", "description": "Get weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                     "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}
SEARCH = {"name": "search", "description": "Search the web (Suche im Netz)", "parameters": {
    "type": "object", "required": ["query"], "properties": {
        "query": {"type": "string", "description": "Query text"},
        "limit": {"type": "integer", "default": 10, "description": "Max results"},
        "safe": {"type": "boolean", "default": True},
        "langs": {"type": "array", "items": {"type": "string"}, "description": "Languages"},
        "since": {"type": "string", "nullable": True},
        "filters": {"type": "object", "properties": {"site": {"type": "string"}, "year": {"type": "number"}},
                    "required": ["site"]},
        "mode": {"type": "string", "enum": ["fast", "deep"], "default": "fast"},
        "scores": {"type": "array", "items": {"type": "object", "properties": {"w": {"type": "number"}}}},
        "id": {"oneOf": [{"type": "string", "description": "a name"}, {"type": "integer", "default": 0}]},
        "kind": {"type": ["string", "null"]},
        "raw": {},
    }}}
NOW = {"name": "now", "description": "Current time"}
DISPLAY = {"name": "display_answers", "description": "Show answers", "parameters": {
    "type": "object", "properties": {"answers": {"type": "array", "items": {"type": "string"}}}}}


def nested(tool):
    return {"type": "function", "function": tool}


def call(name, args, i=0):
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


U = {"role": "user", "content": "What is the weather in Bern?"}
SYS = {"role": "system", "content": "You are a test."}
CALL_TURN = [U, {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Bern"})]},
             {"role": "tool", "tool_call_id": "call_0", "content": '{"temp": 20}'},
             {"role": "assistant", "content": "It is 20 C."}]


# (id, messages, tools, render kwargs, messages as the template reads them (if different), tools likewise)
CASES = [
    ("empty", [], None, {"add_generation_prompt": True}, None, None),
    ("user_gen", [U], None, {"add_generation_prompt": True}, None, None),
    ("user_nogen", [U], None, {}, None, None),
    ("system_user", [SYS, U], None, {"add_generation_prompt": True}, None, None),
    ("spec_minimal", [SYS, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "2+2?"}], None, {"add_generation_prompt": True}, None, None),
    ("multi_turn", [U, {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "And Zürich?"},
                    {"role": "assistant", "content": "Cloudy."}, {"role": "user", "content": "Thanks"}],
     None, {"add_generation_prompt": True}, None, None),
    ("assistant_last", [SYS, U, {"role": "assistant", "content": "Sunny, 24 C."}], None, {}, None, None),
    ("thinking_on", [U], None, {"enable_thinking": True, "add_generation_prompt": True}, None, None),
    ("thought_response", [U, blocks(th("Bern is in Switzerland."), resp("Sunny."))], None,
     {"enable_thinking": True}, None, None),
    ("thought_multi", [U, blocks(th("a"), th(" b"), resp("c")), {"role": "user", "content": "again"},
                       blocks(th("d"), resp("e"))], None, {"enable_thinking": True}, None, None),
    ("thought_truncated", [U, blocks(th("Let me think"))], None,
     {"enable_thinking": True, "continue_assistant_message": True}, None, None),
    ("tools_flat", CALL_TURN, [WEATHER], {}, None, None),
    ("tools_nested", CALL_TURN, [nested(WEATHER)], {}, None, [WEATHER]),
    ("tools_nested_and_flat", CALL_TURN + [{"role": "user", "content": "Search it"}], [nested(WEATHER), SEARCH, NOW],
     {"add_generation_prompt": True}, None, [WEATHER, SEARCH, NOW]),
    ("two_calls_two_results", [U, {"role": "assistant", "content": "Checking both.", "tool_calls": [
        call("get_weather", {"city": "Bern"}), call("get_weather", {"city": "Genève"}, 1)]},
        {"role": "tool", "content": '{"temp": 20}'}, {"role": "tool", "content": '{"temp": 22}'},
        {"role": "assistant", "content": "Bern 20, Genève 22."}], [WEATHER], {}, None, None),
    ("waiting_for_outputs", [U, {"role": "assistant", "content": "", "tool_calls": [call("now", {})]}], [NOW], {},
     None, None),
    ("blocks_tools", [U, blocks(tcalls(("get_weather", {"city": "Bern"})), touts({"temp": 20}), resp("20 C."))],
     [WEATHER], {}, None, None),
    ("blocks_think_tools", [U, blocks(th("Need data."), tcalls(("get_weather", {"city": "Bern"})),
                                      touts({"temp": 20}), th(" Got it."), resp("20 C."))],
     [WEATHER], {"enable_thinking": True}, None, None),
    ("display_answers", [U, blocks(th("Done."), tcalls(("display_answers", {"answers": ["20 C"]})))],
     [DISPLAY], {"enable_thinking": True}, None, None),
    ("non_ascii", [{"role": "system", "content": "Réponds en français. 日本語も。"},
                   {"role": "user", "content": "Grüezi! Wie gaht's? 🇨🇭 مرحبا Привет 世界人权宣言"},
                   {"role": "assistant", "content": "Hoi! Ça va 👍"}], None, {}, None, None),
    ("empty_strings", [{"role": "system", "content": ""}, {"role": "user", "content": ""},
                       {"role": "assistant", "content": ""}, {"role": "user", "content": ""}],
     None, {"add_generation_prompt": True}, None, None),
    ("system_mapping", [{"role": "system", "content": {"text": "Structured system."}}, U], None,
     {"add_generation_prompt": True}, None, None),
    ("user_parts", [{"role": "user", "content": {"parts": [{"type": "text", "text": "Look: "}, {"type": "image"},
                                                           {"type": "text", "text": " what is it?"}]}}],
     None, {"add_generation_prompt": True}, None, None),
    ("user_without_content", [U, {"role": "assistant", "content": "Yes."}, {"role": "user"}], None,
     {"add_generation_prompt": True}, None, None),
    ("tool_content_dict", [U, {"role": "assistant", "content": "", "tool_calls": [call("now", {})]},
                           {"role": "tool", "content": {"time": "12:00", "tz": "Europe/Zürich"}},
                           {"role": "assistant", "content": "Noon."}], [NOW], {},
     [U, {"role": "assistant", "content": "", "tool_calls": [call("now", {})]},
      {"role": "tool", "content": '{"time": "12:00", "tz": "Europe/Zürich"}'},
      {"role": "assistant", "content": "Noon."}], None),
    ("arguments_dict", [U, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]}], [WEATHER], {},
     [U, {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}]}], None),
    ("content_null", [U, {"role": "assistant", "content": None, "tool_calls": [call("now", {})]},
                      {"role": "tool", "content": "12:00"}, {"role": "assistant", "content": "Noon."}], [NOW], {},
     [U, {"role": "assistant", "content": "", "tool_calls": [call("now", {})]},
      {"role": "tool", "content": "12:00"}, {"role": "assistant", "content": "Noon."}], None),
    ("content_absent_type_absent", [U, {"role": "assistant", "tool_calls": [
        {"function": {"name": "now", "arguments": "{}"}}]}, {"role": "tool", "content": "12:00"}], [NOW], {},
     [U, {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "now", "arguments": "{}"}}]},
      {"role": "tool", "content": "12:00"}], None),
    ("many_tools_thinking", [U], [SEARCH, WEATHER, NOW, DISPLAY], {"enable_thinking": True,
                                                                  "add_generation_prompt": True}, None, None),
    ("tools_empty_list", [U], [], {"add_generation_prompt": True}, None, None),
    ("tool_then_more_assistant", [U, {"role": "assistant", "content": "Let me look.", "tool_calls": [
        call("now", {})]}, {"role": "tool", "content": "12:00"}, {"role": "assistant", "content": "It is noon."},
        {"role": "assistant", "content": " Anything else?"}], [NOW], {}, None, None),
    ("tool_then_user", [U, {"role": "assistant", "content": "", "tool_calls": [call("now", {})]},
                        {"role": "tool", "content": "12:00"}, {"role": "user", "content": "ok"}], [NOW],
     {"add_generation_prompt": True}, None, None),
    ("whitespace", [{"role": "user", "content": "  two leading spaces\n\nand a blank line\n"},
                    {"role": "assistant", "content": "\n\tTabbed\r\nCRLF  "}], None, {}, None, None),
    ("jinja_like_text", [{"role": "user", "content": "{{ bos_token }} {% if x %}{# c #}"},
                         {"role": "assistant", "content": "{%- raw -%}"}], None, {}, None, None),
    ("special_text_in_content", [{"role": "user", "content": "say <|assistant_end|> and </s>"}], None,
     {"add_generation_prompt": True}, None, None),
    ("developer_first", [{"role": "developer", "content": "Be brief."}, U], None, {"add_generation_prompt": True},
     [{"role": "system", "content": "Be brief."}, U], None),
    ("openai_content_parts", [{"role": "system", "content": [{"type": "text", "text": "Be "},
                                                             {"type": "text", "text": "kind."}]},
                              {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                           {"type": "image_url", "image_url": {"url": "x"}}]}],
     None, {"add_generation_prompt": True},
     [{"role": "system", "content": "Be kind."}, {"role": "user", "content": {"parts": [
         {"type": "text", "text": "Hi "}, {"type": "image"}]}}], None),
    ("long_conversation", [m for k in range(10) for m in (
        {"role": "user", "content": f"Question {k}: {'ä' * k}?"}, {"role": "assistant", "content": f"Answer {k}."})],
     None, {}, None, None),
    ("blocks_gen_prompt_tools", [U, blocks(th("t"), resp("r")), {"role": "user", "content": "more"}],
     [nested(SEARCH)], {"enable_thinking": True, "add_generation_prompt": True}, None, [SEARCH]),
    ("unicode_tool_call", [U, {"role": "assistant", "content": "", "tool_calls": [
        call("get_weather", {"city": "Zürich", "note": "天气"})]}], [WEATHER], {}, None, None),
    ("blocks_many_outputs", [U, blocks(tcalls(("now", {}), ("get_weather", {"city": "Chur"})),
                                       touts("12:00", {"temp": 3}), resp("Noon and 3 C."))],
     [NOW, WEATHER], {}, None, None),
    ("blocks_empty", [U, blocks()], None, {}, None, None),
    ("response_only_block", [U, blocks(resp("Just this."))], None, {}, None, None),
    ("inner_kept_across_messages", [U, blocks(th("part 1")), blocks(th(" part 2"), resp("done"))], None,
     {"enable_thinking": True}, None, None),
    ("assistant_prefill", [U, {"role": "assistant", "content": "The answer is"}], None,
     {"continue_assistant_message": True}, None, None),
]
IDS = [c[0] for c in CASES]


def template_inputs(case):
    _, messages, tools, _, tmessages, ttools = case
    return (tmessages if tmessages is not None else messages), (ttools if ttools is not None else tools)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_render_matches_official_template(case, official):
    _, messages, tools, kw, tmessages, ttools = case
    original = copy.deepcopy(messages)
    ref_messages, ref_tools = template_inputs(case)
    if tmessages is None:  # already in the template's shape: normalisation must not change anything
        assert normalize_messages(messages) == messages
    if ttools is None and tools:
        assert normalize_tools(tools) == tools
    assert render(messages, tools=tools, date=DATE, **kw) == official(ref_messages, ref_tools, **kw)
    assert messages == original  # inputs are not modified


def test_enough_parity_cases():
    assert len(CASES) >= 40 and len(set(IDS)) == len(IDS)


@pytest.mark.parametrize("case", [c for c in CASES if c[1]], ids=[c[0] for c in CASES if c[1]])
def test_ids_match_transformers_apply_chat_template(case, hf_tokenizer, official, template_dir, tok):
    _, messages, tools, kw, _, _ = case
    ref_messages, ref_tools = template_inputs(case)
    template = (template_dir / "chat_template.jinja").read_text()
    text = hf_tokenizer.apply_chat_template(ref_messages, tools=ref_tools, chat_template=template, tokenize=False, **kw)
    assert text == official(ref_messages, ref_tools, **kw)  # the pinned date reached transformers
    ref = hf_tokenizer.apply_chat_template(ref_messages, tools=ref_tools, chat_template=template, tokenize=True,
                                           return_dict=False, **kw)
    ids, mask = encode_chat(tok, messages, tools=tools, date=DATE, **kw)
    assert ids == list(ref) and len(mask) == len(ids)


def _generation_tagged(template: str) -> str:
    """The official template with transformers' {% generation %} marks around what the assistant writes: its text,
    reasoning markers, tool calls and <|assistant_end|> (not tool outputs, not <|assistant_start|>)."""
    g = lambda s: "{% generation %}" + s + "{% endgeneration %}"  # noqa: E731
    assistant_text = '{%- set ns.assistant_format = "string" -%}\n                {{ message.content }}'
    assert template.count(assistant_text) == 1
    template = template.replace(assistant_text,
                                '{%- set ns.assistant_format = "string" -%}' + g("{{ message.content }}"))
    for expr in ("{{ end_assistant_token }}", "{{ inner_token }}", "{{ outer_token }}", "{{ block.text }}"):
        assert expr in template
        template = template.replace(expr, g(expr))
    assert template.count("{{ tool_calls_token + '[' }}") == 2 == template.count("{{ ']' + end_tool_calls_token }}")
    template = template.replace("{{ tool_calls_token + '[' }}", "{% generation %}{{ tool_calls_token + '[' }}")
    return template.replace("{{ ']' + end_tool_calls_token }}", "{{ ']' + end_tool_calls_token }}{% endgeneration %}")


@pytest.mark.parametrize("case", [c for c in CASES if c[1]], ids=[c[0] for c in CASES if c[1]])
def test_assistant_mask_matches_transformers_generation_mask(case, hf_tokenizer, template_dir, tok):
    _, messages, tools, kw, _, _ = case
    ref_messages, ref_tools = template_inputs(case)
    template = (template_dir / "chat_template.jinja").read_text()
    tagged = _generation_tagged(template)
    assert (hf_tokenizer.apply_chat_template(ref_messages, tools=ref_tools, chat_template=tagged, tokenize=False, **kw)
            == hf_tokenizer.apply_chat_template(ref_messages, tools=ref_tools, chat_template=template, tokenize=False,
                                                **kw))
    ref = hf_tokenizer.apply_chat_template(ref_messages, tools=ref_tools, chat_template=tagged, tokenize=True,
                                           return_dict=True, return_assistant_tokens_mask=True, **kw)
    ids, mask = encode_chat(tok, messages, tools=tools, date=DATE, **kw)
    assert ids == ref["input_ids"]
    assert [int(m) for m in mask] == ref["assistant_masks"]


def test_mask_covers_assistant_text_and_end_only(tok):
    ids, mask = encode_chat(tok, CASES[11][1], tools=[WEATHER], date=DATE)  # tools_flat
    written = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert written.endswith("It is 20 C.<|assistant_end|>")
    assert '<|tools_prefix|>[{"get_weather": {"city": "Bern"}}]<|tools_suffix|>' in written
    assert "<|assistant_start|>" not in written and "temp" not in written and "Bern?" not in written


# --- the reference vectors of docs/recipe.md §1.3 ---------------------------------------------------------------------


def test_spec_minimal_chat_ids(tok):
    messages = CASES[4][1]
    text = render(messages, add_generation_prompt=True)
    assert text == ("<s><|system_start|>You are a test.<|system_end|><|developer_start|>Deliberation: disabled\n"
                    "Tool Capabilities: disabled<|developer_end|><|user_start|>Hi<|user_end|><|assistant_start|>"
                    "Hello!<|assistant_end|><|user_start|>2+2?<|user_end|><|assistant_start|>")
    ids, mask = encode_chat(tok, messages, add_generation_prompt=True)
    assert ids == [1, 61, 4568, 1584, 1261, 2688, 1046, 62, 63, 19202, 6144, 1370, 1058, 21332, 1010, 22483, 7601,
                   14793, 1058, 21332, 64, 65, 37133, 66, 67, 22177, 1033, 68, 65, 1050, 1043, 1050, 1063, 66, 67]
    assert [i for i, m in zip(ids, mask, strict=True) if m] == [22177, 1033, 68]


def test_spec_default_system_tools_and_tool_turn():
    text = render([U], tools=[WEATHER], date="2025-09-02", add_generation_prompt=True)
    assert ("<|system_start|>You are Apertus, a helpful assistant created by the SwissAI initiative.\n"
            "Knowledge cutoff: 2024-04\nCurrent date: 2025-09-02<|system_end|>") in text
    assert ('Tool Capabilities:\n// Get weather\ntype get_weather = (_: {\n// City name\ncity: string,\n'
            'unit?: "c" | "f"\n}) => any;<|developer_end|>') in text
    turn = render(CALL_TURN, tools=[WEATHER], date="2025-09-02")
    assert turn.endswith('<|assistant_start|><|tools_prefix|>[{"get_weather": {"city": "Bern"}}]<|tools_suffix|>'
                         '[{"temp": 20}]It is 20 C.<|assistant_end|>')
    assert render([U, blocks(th("hmm"), resp("ok"))], date=DATE).endswith(
        "<|assistant_start|><|inner_prefix|>hmm<|inner_suffix|>ok<|assistant_end|>")


def test_date_default_is_today():
    assert datetime.date.today().isoformat() in render([U])
    assert "Current date: 2024-01-31" in render([U], date=datetime.date(2024, 1, 31))


def test_openai_shape_matches_llamacpp_template(official):
    """The llama.cpp variant reads nested tools, dict arguments and content null natively: a second reference for
    the normalisation (it differs only in how a conversation ending with an assistant turn is closed)."""
    messages = [SYS, U, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Bern"}}}]},
        {"role": "tool", "content": '{"temp": 20}'}, {"role": "assistant", "content": "20 C."},
        {"role": "user", "content": "Danke!"}]
    tools = [nested(WEATHER), nested(SEARCH), nested(NOW)]
    for kw in ({"add_generation_prompt": True}, {"enable_thinking": True, "add_generation_prompt": True}):
        assert render(messages, tools=tools, **kw) == official(messages, tools, name="chat_template_llamacpp.jinja",
                                                               **kw)


# --- random tool schemas: the TypeScript rendering macro, quirks included ----------------------------------------


def _schema(rng, depth=0):
    kind = rng.choice(["string", "number", "integer", "boolean", "array", "object", "list", "oneOf", "unknown", "none"])
    s = {}
    if kind == "string":
        s["type"] = "string"
        if rng.random() < 0.3:
            s["enum"] = rng.sample(["a", "b c", "ü", "x\"y", "1"], rng.randint(1, 3))
    elif kind in ("number", "integer", "boolean", "unknown"):
        s["type"] = {"unknown": "null"}.get(kind, kind)
    elif kind == "array":
        s["type"] = "array"
        if rng.random() < 0.8 and depth < 3:
            s["items"] = _schema(rng, depth + 1)
    elif kind == "object":
        s["type"] = "object"
        if rng.random() < 0.8 and depth < 3:
            s["properties"] = {f"p{k}": _schema(rng, depth + 1) for k in range(rng.randint(0, 3))}
            if s["properties"] and rng.random() < 0.6:
                s["required"] = rng.sample(list(s["properties"]), rng.randint(0, len(s["properties"])))
    elif kind == "list":
        s["type"] = rng.sample(["string", "number", "null", "object"], rng.randint(1, 3))
    elif kind == "oneOf" and depth < 3:
        s["oneOf"] = [_schema(rng, depth + 1) for _ in range(rng.randint(1, 3))]
        for v in s["oneOf"]:
            if rng.random() < 0.3:
                v["description"] = "variant"
            if rng.random() < 0.3:
                v["default"] = rng.choice([0, "z", None, [1, "ü"]])
    if rng.random() < 0.2:
        s["nullable"] = rng.random() < 0.7
    if rng.random() < 0.4:
        s["description"] = rng.choice(["plain", "mit Umlaut ä", "", "plain", "mit Umlaut ä", "", 7])  # 7: an error
    if rng.random() < 0.3:
        s["default"] = (rng.choice(["a", "b c"]) if ("enum" in s or "oneOf" in s)
                        else rng.choice([1, 2.5, "x", True, None, {"k": "ü"}, [1, 2]]))
        if rng.random() < 0.05:
            s["default"] = 3  # with an enum or oneOf, the template concatenates it and fails
    return s


def test_random_tool_schemas_match_official_template(official):
    rng = random.Random(0)
    rendered = failed = 0
    for n in range(400):
        tools = []
        for k in range(rng.randint(1, 3)):
            tool = {"name": f"tool_{k}", "description": rng.choice(["Does things.", "", "Ünïcödé"])}
            if rng.random() < 0.85:
                props = {f"arg{j}": _schema(rng) for j in range(rng.randint(0, 4))}
                tool["parameters"] = {"type": "object", "properties": props}
                if props and rng.random() < 0.7:
                    tool["parameters"]["required"] = rng.sample(list(props), rng.randint(0, len(props)))
            tools.append(tool)
        try:
            expected = official([U], tools, add_generation_prompt=True)
        except Exception:  # the template cannot render it: neither may we
            with pytest.raises(ValueError):
                render([U], tools=tools, date=DATE, add_generation_prompt=True)
            failed += 1
            continue
        assert render([U], tools=tools, date=DATE, add_generation_prompt=True) == expected, (n, tools)
        rendered += 1
    assert rendered > 200 and failed > 10  # both paths were exercised


# --- invalid conversations ----------------------------------------------------------------------------------------

INVALID = [
    ("unknown role", [{"role": "robot", "content": "beep"}], "Invalid message role"),
    ("system not first", [U, {"role": "system", "content": "late"}], "Invalid message role"),
    ("tool outside assistant", [U, {"role": "tool", "content": "x"}], "Tool message outside of assistant"),
    ("tool first", [{"role": "tool", "content": "x"}], "Tool message outside of assistant"),
    ("string then blocks", [U, {"role": "assistant", "content": "a"}, U, blocks(resp("b"))],
     "Invalid assistant content"),
    ("blocks then string", [U, blocks(resp("b")), U, {"role": "assistant", "content": "a"}],
     "Invalid assistant content"),
    ("bad block", [U, blocks({"type": "image", "text": "x"})], "Invalid assistant block type: image"),
    ("bad user part", [{"role": "user", "content": {"parts": [{"type": "audio"}]}}], "Invalid user part: audio"),
    ("bad user content", [{"role": "user", "content": None}], "Invalid user message: user"),
    ("bad system", [{"role": "system", "content": 42}, U], "Invalid system message"),
    ("system without content", [{"role": "system"}, U], "Invalid system message"),
    ("assistant without content", [U, {"role": "assistant"}], "Invalid assistant message"),
    ("bad tool call type", [U, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "retrieval", "function": {"name": "x", "arguments": "{}"}}]}], "Invalid tool call type: retrieval"),
    ("both output kinds", [U, blocks(tcalls(("now", {}))), {"role": "tool", "content": "1"}, blocks(touts("2"))],
     "Cannot have both tool outputs as separate messages and tool outputs as blocks"),
]


@pytest.mark.parametrize("name,messages,message", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_conversations_raise_like_the_template(name, messages, message, official):
    with pytest.raises(jinja2.exceptions.TemplateError, match=message):
        official(messages, None)
    with pytest.raises(ValueError, match=message):
        render(messages)


def test_invalid_inputs_are_value_errors():
    with pytest.raises(ValueError, match="list of dicts"):
        render("hello")
    with pytest.raises(ValueError, match="not a dict"):
        render(["hello"])
    with pytest.raises(ValueError, match="name"):
        render([U], tools=[{"description": "no name"}])
    with pytest.raises(ValueError):
        render([U, {"role": "assistant", "content": "", "tool_calls": [{"type": "function"}]}])


# --- parsing replies -----------------------------------------------------------------------------------------------

ROUND_TRIPS = [
    ({"role": "assistant", "content": "Plain answer, with ü."}, {}, ("Plain answer, with ü.", None, [])),
    ({"role": "assistant", "content": "Checking.", "tool_calls": [
        call("get_weather", {"city": "Bern"}), call("now", {}, 1)]}, {},
     ("Checking.", None, [("get_weather", {"city": "Bern"}), ("now", {})])),
    (blocks(th("The user wants weather."), resp("Sunny.")), {"enable_thinking": True},
     ("Sunny.", "The user wants weather.", [])),
    (blocks(th("Need data."), tcalls(("get_weather", {"city": "Genève", "unit": "c"}))), {"enable_thinking": True},
     ("", "Need data.", [("get_weather", {"city": "Genève", "unit": "c"})])),
    (blocks(tcalls(("search", {"query": "x", "langs": ["de", "fr"]}))), {}, ("", None, [
        ("search", {"query": "x", "langs": ["de", "fr"]})])),
]


@pytest.mark.parametrize("message,kw,expected", ROUND_TRIPS)
def test_parse_reply_round_trips_rendered_turns(message, kw, expected, tok):
    text = render([U, message], tools=[WEATHER, NOW, SEARCH], **kw)
    for reply in (parse_reply(text), parse_reply(encode_chat(tok, [U, message], **kw)[0], tok)):
        content, reasoning, calls = expected
        assert reply["content"] == content and reply["reasoning_content"] == reasoning
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reply["tool_calls"]] == calls
        assert all(c["type"] == "function" for c in reply["tool_calls"])
        assert len({c["id"] for c in reply["tool_calls"]}) == len(calls)


def test_parse_reply_generated_shapes(tok):
    # the engine stops on <|tools_suffix|> (id 72) and may drop it
    assert parse_reply('<|tools_prefix|>[{"now": {}}]')["tool_calls"][0]["function"] == {"name": "now",
                                                                                         "arguments": "{}"}
    r = parse_reply('<|tools_prefix|>[{"name": "now", "arguments": {"tz": "UTC"}}]<|tools_suffix|>')
    assert r["tool_calls"][0]["function"] == {"name": "now", "arguments": '{"tz": "UTC"}'}
    # the prompt opened the reasoning (<|inner_prefix|> in the prefill): text before the suffix is reasoning
    assert parse_reply("thinking...<|inner_suffix|>Answer") == {"content": "Answer", "reasoning_content": "thinking...",
                                                                "tool_calls": []}
    # cut off while reasoning
    assert parse_reply("<|tools_prefix|>[]<|tools_suffix|>") == {"content": "", "reasoning_content": None,
                                                                 "tool_calls": []}
    assert parse_reply("<|inner_prefix|>still thinking") == {"content": "", "reasoning_content": "still thinking",
                                                             "tool_calls": []}
    # stops at the end token; ids work with the real tokenizer
    assert parse_reply(tok.encode("Hi!<|assistant_end|>junk", bos=False), tok)["content"] == "Hi!"
    assert parse_reply(tok.encode("<|assistant_start|>Hey</s>", bos=False))["content"] == "Hey"


@pytest.mark.parametrize("raw", [
    '<|tools_prefix|>[{"get_weather": {"city": "Be',
    "<|tools_prefix|>[not json]<|tools_suffix|>",
    '<|tools_prefix|>[{"a": 1, "b": 2}]<|tools_suffix|>',
    '<|tools_prefix|>"just a string"<|tools_suffix|>',
    "<|tools_prefix|>" + "[" * 5000,
])
def test_parse_reply_malformed_calls_stay_text(raw):
    r = parse_reply("Before. " + raw)
    assert r["tool_calls"] == [] and r["content"].startswith("Before. ")
    assert "<|tools_prefix|>" not in r["content"]
    assert raw.split("<|tools_prefix|>")[1].split("<|tools_suffix|>")[0] in r["content"]


def test_parse_reply_never_raises_on_any_prefix(tok):
    message = blocks(th("Plan: call."), tcalls(("get_weather", {"city": "Zürich"})), touts({"t": 1}),
                     th(" ok"), resp("Done ✓"))
    text = render([U, message], enable_thinking=True)
    ids = tok.encode(text, bos=False)
    for k in range(len(text) + 1):
        r = parse_reply(text[:k])
        assert set(r) == {"content", "reasoning_content", "tool_calls"}
    for k in range(len(ids) + 1):
        parse_reply(ids[:k], tok)
    rng = random.Random(1)
    pieces = ["<|inner_prefix|>", "<|inner_suffix|>", "<|tools_prefix|>", "<|tools_suffix|>", "[", "]", "{", "}",
              '"', ":", "x", "<|assistant_end|>", "<|assistant_start|>"]
    for _ in range(300):
        parse_reply("".join(rng.choice(pieces) for _ in range(rng.randint(0, 20))))
    parse_reply([10**9, -1, 5], tok)  # ids out of range decode to nothing rather than raising


def test_stop_ids_are_the_instruct_stop_tokens(tok):
    assert STOP_IDS == tuple(tok.token_id(t) for t in ("</s>", "<|assistant_end|>", "<|tools_suffix|>"))
