"""The SFT chat format against Apertus' SFT template run by jinja2 and by transformers (ids and assistant masks).

References we did not write: `sft_chat_template.jinja` (swiss-ai/posttraining `CHAT_TEMPLATES["apertus"]`), jinja2 as
transformers configures it, transformers' `apply_chat_template` with `{% generation %}` marks for the assistant mask,
and the real Apertus tokenizer.
"""

import json
import random

import jinja2
import jinja2.ext
import pytest
from chat_helpers import blocks, resp, tcalls, th, touts
from jinja2.sandbox import ImmutableSandboxedEnvironment

from apertus.chat import encode_chat, render
from apertus.chat_sft import render_sft, sft_messages
from apertus.tokenizer import Tokenizer

TEMPLATE = "sft_chat_template.jinja"
RELEASE_NAMES = ["<|system_start|>", "<|system_end|>", "<|developer_start|>", "<|developer_end|>", "<|user_start|>",
                 "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>", "<|inner_prefix|>", "<|inner_suffix|>",
                 "<|tools_prefix|>", "<|tools_suffix|>"]


@pytest.fixture(scope="module")
def template_text(data_dir):
    import apertus

    shipped = (apertus.__path__[0] + "/templates/" + TEMPLATE)
    with open(shipped, "rb") as f:
        ours = f.read()
    assert ours == (data_dir / "apertus_tokenizer" / TEMPLATE).read_bytes()  # the package's copy is byte-identical
    return ours.decode("utf-8")


@pytest.fixture(scope="module")
def sft_jinja(template_text):
    """The SFT template as transformers runs chat templates (trim/lstrip blocks, raise_exception)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    template = env.from_string(template_text)
    return lambda messages, **kw: template.render(messages=messages, **kw)


@pytest.fixture(scope="module")
def tok(apertus_tokenizer_json):
    return Tokenizer.from_file(apertus_tokenizer_json)


# --- conversations in the template's shape ---------------------------------------------------------------------------

U = {"role": "user", "content": "What is the weather in Bern?"}
SYS = {"role": "system", "content": "You are a test."}


CASES = {
    "empty": ([], {"add_generation_prompt": True}),
    "user_gen": ([U], {"add_generation_prompt": True}),
    "no_system_assistant": ([U, {"role": "assistant", "content": "Sunny."}], {}),
    "system_text_mapping": ([{"role": "system", "content": {"text": "Sys as mapping"}}, U], {}),
    "system_then_turns": ([SYS, U, {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Zürich?"},
                           {"role": "assistant", "content": "Cloudy."}], {}),
    "developer_thinking": ([SYS, {"role": "developer", "content": {"has_thinking": True}}, U], {}),
    "developer_no_system": ([{"role": "developer", "content": {"has_thinking": False, "formatted_tools": "type f"}},
                             U], {"add_generation_prompt": True}),
    "developer_empty_tools": ([{"role": "developer", "content": {"formatted_tools": ""}}, U], {}),
    "developer_string": ([{"role": "developer", "content": "has_thinking? yes"}, U], {}),
    "user_parts": ([{"role": "user", "content": {"parts": [{"type": "text", "text": "a "}, {"type": "image"},
                                                           {"type": "text", "text": "b"}, {"text": "x"}]}}], {}),
    "user_list_renders_empty": ([{"role": "user", "content": [{"type": "text", "text": "lost"}]}], {}),
    "user_mapping_no_parts": ([{"role": "user", "content": {"text": "lost too"}}], {}),
    "thoughts_response": ([U, blocks(th("Let me think."), th(" More."), resp("Sunny."))], {}),
    "tool_flow": ([U, blocks(th("Need data."), tcalls(("get_weather", {"city": "Bern"})), touts({"temp": 20}),
                             resp("It is 20 C."))], {}),
    "two_outputs_last": ([U, blocks(tcalls(("a", {}), ("b", {"x": [1, 2]})), touts(1, "two"))], {}),
    "display_answers": ([U, blocks(th("Thinking"), tcalls(("display_answers", {"answers": ["4"]})))], {}),
    "display_answers_first": ([U, blocks(tcalls(("display_answers", {"answers": ["4"]})))], {}),
    "response_first_no_outer": ([U, blocks(resp("Hi "), th("then think"), resp("done"))], {}),
    "empty_blocks": ([U, blocks()], {}),
    "mapping_no_blocks": ([U, {"role": "assistant", "content": {"text": "ignored"}}], {}),
    "non_string_outputs": ([U, blocks({"type": "tool_outputs", "outputs": [{"output": {"a": 1}}, {"output": None},
                                                                             {}]}, resp("ok"))], {}),
    "text_none": ([U, blocks(th(None), resp(None))], {}),
    "assistant_gen_prompt": ([U, {"role": "assistant", "content": "Hi"}, U], {"add_generation_prompt": True}),
}
INVALID = {
    "tool_role": [U, {"role": "tool", "content": "x"}],
    "bad_system": [{"role": "system", "content": 5}],
    "bad_user": [{"role": "user", "content": None}],
    "bad_assistant": [U, {"role": "assistant", "content": 3}],
    "bad_block": [U, blocks({"type": "code", "text": "x"})],
    "dict_arguments": [U, blocks({"type": "tool_calls", "calls": [{"name": "f", "arguments": {"a": 1}}]})],
    "missing_user_content": [{"role": "user"}],
    "bad_developer": [{"role": "developer", "content": None}],
}


@pytest.mark.parametrize("name", CASES)
def test_render_matches_sft_template(name, sft_jinja):
    messages, kw = CASES[name]
    assert render_sft(messages, **kw) == sft_jinja(messages, **kw)


@pytest.mark.parametrize("name", INVALID)
def test_invalid_conversations_raise_like_the_template(name, sft_jinja):
    with pytest.raises((jinja2.exceptions.TemplateError, TypeError)):  # its raise_exception or a failed `+`/`in`
        sft_jinja(INVALID[name])
    with pytest.raises(ValueError):
        render_sft(INVALID[name])


TEXTS = ["Hi", "", "Grüezi mitenand!", "line\nbreak", "  spaces  ", '{"json": [1, 2]}', "日本語 🚀", "a, b]", "None",
         "display_answers"]


def _random_text(rng):
    return rng.choice(TEXTS) + rng.choice(["", " ", "?", str(rng.randint(0, 99))])


def _random_block(rng):
    kind = rng.choice(["thoughts", "response", "tool_calls", "tool_outputs"])
    if kind in ("thoughts", "response"):
        return {"type": kind, "text": _random_text(rng)}
    if kind == "tool_calls":
        names = ["display_answers"] if rng.random() < 0.3 else [rng.choice(["f", "get_weather", "search"])
                                                                 for _ in range(rng.randint(0, 3))]
        return {"type": "tool_calls", "calls": [{"name": n, "arguments": json.dumps({"q": _random_text(rng)})}
                                                for n in names]}
    return {"type": "tool_outputs", "outputs": [{"output": _random_text(rng)} for _ in range(rng.randint(0, 3))]}


def random_conversation(rng):
    messages = []
    if rng.random() < 0.5:
        text = _random_text(rng)
        messages.append({"role": "system", "content": text if rng.random() < 0.7 else {"text": text}})
    if rng.random() < 0.4:
        dev = {}
        if rng.random() < 0.6:
            dev["has_thinking"] = rng.random() < 0.5
        if rng.random() < 0.6:
            dev["formatted_tools"] = rng.choice(["", "type f = () => any;", "// d\ntype g = (_: {\nx: string\n}) "
                                                 "=> any;"])
        messages.append({"role": "developer", "content": dev})
    for _ in range(rng.randint(0, 4)):
        if rng.random() < 0.8:
            text = _random_text(rng)
            messages.append({"role": "user", "content": text if rng.random() < 0.7 else {"parts": [
                {"type": "text", "text": text}, {"type": "image"}]}})
        if rng.random() < 0.8:
            content = (_random_text(rng) if rng.random() < 0.4
                       else {"blocks": [_random_block(rng) for _ in range(rng.randint(0, 5))]})
            messages.append({"role": "assistant", "content": content})
    return messages, {"add_generation_prompt": rng.random() < 0.5}


def test_random_conversations_match_sft_template(sft_jinja):
    rng = random.Random(0)
    checked = 0
    for _ in range(500):
        messages, kw = random_conversation(rng)
        assert render_sft(messages, **kw) == sft_jinja(messages, **kw), messages
        checked += "<SPECIAL_70>" in sft_jinja(messages, **kw)
    assert checked > 10  # the inner/outer switching really occurs


# --- from the shapes chat.py takes --------------------------------------------------------------------------------

WEATHER = {"name": "get_weather", "description": "Get weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "City name"}}, "required": ["city"]}}
OPENAI_TOOL_TURN = [U, {"role": "assistant", "content": "Let me look.", "tool_calls": [
    {"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Bern"}}}]},
    {"role": "tool", "tool_call_id": "c0", "content": {"temp": 20}}, {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is 20 C."}, {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome."}]


def test_openai_tool_turn_becomes_one_assistant_message(sft_jinja):
    converted = sft_messages(OPENAI_TOOL_TURN, tools=[WEATHER], enable_thinking=True)
    text = sft_jinja(converted)
    assert render_sft(converted) == text
    tools_text = render([U], tools=[WEATHER]).split("Tool Capabilities:\n", 1)[1].split("<|developer_end|>")[0]
    assert text == (
        "<SPECIAL_61><SPECIAL_62><SPECIAL_63>Deliberation: enabled\nTool Capabilities:\n" + tools_text
        + "<SPECIAL_64><SPECIAL_65>What is the weather in Bern?<SPECIAL_66>"
        '<SPECIAL_67>Let me look.<SPECIAL_71>[{"get_weather": {"city": "Bern"}}]<SPECIAL_72>[{"temp": 20}, sunny] '
        "It is 20 C.<SPECIAL_68><SPECIAL_65>Thanks<SPECIAL_66><SPECIAL_67>You're welcome.<SPECIAL_68>")


def test_template_shaped_messages_pass_unchanged():
    rng = random.Random(1)
    shaped = [m for m, _ in CASES.values()] + [random_conversation(rng)[0] for _ in range(100)]
    for messages in shaped:
        # not: OpenAI content lists (made parts), a developer message with a string (the OpenAI system message)
        if all(not isinstance(m.get("content"), list) and m.get("content") != {"text": "lost too"}
               and not (m.get("role") == "developer" and isinstance(m.get("content"), str)) for m in messages):
            assert sft_messages(messages) == messages


# --- ids and assistant masks against transformers -------------------------------------------------------------------


def _hf_template(template: str) -> str:
    """The SFT template as Apertus tokenized with it: `<s>` first (add_bos_to_chat_template), the released names of
    ids 61-72 for the SFT-time ones (same ids), and transformers' {% generation %} marks around what the assistant
    writes: its text, reasoning markers, tool calls and the end token (not the tool outputs, not the start token)."""
    g = lambda s: "{% generation %}" + s + "{% endgeneration %}"  # noqa: E731
    for expr in ("{{ content }}", "{{ inner_token }}", "{{ outer_token }}", "{{ block.text }}",
                 "{{ end_assistant_token }}"):
        # user and assistant string content print the same expression; thoughts and response blocks too
        assert template.count(expr) == (1 if expr in ("{{ inner_token }}", "{{ end_assistant_token }}") else 2), expr
        if expr == "{{ content }}":  # only the assistant's (the second)
            head, _, tail = template.rpartition(expr)
            template = head + g(expr) + tail
        else:
            template = template.replace(expr, g(expr))
    start, end = "{{ tool_calls_token + '[' }}", "{{ ']' + end_tool_calls_token }}"
    assert template.count(start) == 1 == template.count(end)
    template = template.replace(start, "{% generation %}" + start).replace(end, end + "{% endgeneration %}")
    for i, name in enumerate(RELEASE_NAMES):
        template = template.replace(f"'<SPECIAL_{61 + i}>'", f"'{name}'")
    return "{{ bos_token }}" + template


@pytest.fixture(scope="module")
def hf_tokenizer(apertus_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(apertus_tokenizer_dir))


ENCODE_CASES = {name: CASES[name] for name in ("user_gen", "system_then_turns", "developer_thinking", "tool_flow",
                                               "two_outputs_last", "display_answers", "response_first_no_outer",
                                               "non_string_outputs", "assistant_gen_prompt", "user_parts")}


@pytest.mark.parametrize("name", [*ENCODE_CASES, "openai_tools", *[f"random{i}" for i in range(8)]])
def test_ids_and_mask_match_transformers(name, hf_tokenizer, template_text, tok):
    if name in ENCODE_CASES:
        messages, kw = ENCODE_CASES[name]
        template_messages, tools, thinking = messages, None, False
    elif name == "openai_tools":
        messages, kw, tools, thinking = OPENAI_TOOL_TURN, {}, [WEATHER], True
        template_messages = sft_messages(messages, tools, thinking)
    else:
        messages, kw = random_conversation(random.Random(100 + int(name[6:])))
        messages = messages or [U]  # transformers refuses an empty conversation
        template_messages, tools, thinking = messages, None, False
    tagged = _hf_template(template_text)
    ref = hf_tokenizer.apply_chat_template(template_messages, chat_template=tagged, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True, **kw)
    ids, mask = encode_chat(tok, messages, tools=tools, enable_thinking=thinking, format="apertus-sft", **kw)
    assert ids == ref["input_ids"] and ids[0] == 1  # <s> first
    assert [int(m) for m in mask] == ref["assistant_masks"]


def test_mask_covers_assistant_text_and_end_only(tok):
    ids, mask = encode_chat(tok, OPENAI_TOOL_TURN, tools=[WEATHER], format="apertus-sft")
    written = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    # " It" straddles the space after the tool outputs and the reply: it counts as the assistant's
    assert written == ('Let me look.<|tools_prefix|>[{"get_weather": {"city": "Bern"}}]<|tools_suffix|> It is 20 C.'
                       "<|assistant_end|>You're welcome.<|assistant_end|>")
    assert "temp" not in written and "sunny" not in written and "Bern?" not in written
    assert ids.count(67) == 2 and ids.count(68) == 2  # one start/end pair per assistant message


def test_formats_differ_where_apertus_said(tok):
    conv = [U, {"role": "assistant", "content": "Sunny."}]
    release = tok.decode(encode_chat(tok, conv, date="2025-09-02")[0])
    sft = tok.decode(encode_chat(tok, conv, date="2025-09-02", format="apertus-sft")[0])
    assert "You are Apertus" in release and "<|system_start|><|system_end|>" in sft
    assert release.split("<|user_start|>")[1] == sft.split("<|user_start|>")[1]  # the turns themselves agree
    with pytest.raises(ValueError, match="unknown chat format"):
        encode_chat(tok, conv, format="chatml")


def test_one_turn_with_a_system_message_is_the_same_in_both_formats(tok):
    """What recipes/sft_tiny.toml states: GSM8K rows with a system message train on the same tokens either way."""
    conv = [SYS, U, {"role": "assistant", "content": "#### 4"}]
    assert encode_chat(tok, conv, format="apertus-sft") == encode_chat(tok, conv, format="release")
