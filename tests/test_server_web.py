"""The web chat page in a real browser: headless Chromium (Debian's `chromium`) driven by playwright loads `/`,
sends messages and sees the reply stream in; reasoning is folded; Stop cancels the generation on the server.
Screenshots go to test-artifacts/. Skipped when /usr/bin/chromium is absent (`apt-get install -y chromium`)."""

import json
from pathlib import Path

import httpx
import pytest
from server_helpers import MODEL, REPLY, THOUGHT, checkpoint, served, slow_down, wait_idle

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install -y chromium)")

# every text the assistant bubble shows, as it changes
RECORD = """() => {
  window.seen = [];
  new MutationObserver(() => {
    const all = document.querySelectorAll('.msg.assistant .content');
    if (all.length) window.seen.push(all[all.length - 1].textContent);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture
def browser(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=str(CHROMIUM),
                                                       headless=True, args=FLAGS, viewport={"width": 1100,
                                                                                            "height": 700})
        errors = []
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page, sync_api.expect
        context.close()
        assert errors == []


def set_range(page, selector, value):
    page.eval_on_selector(selector, "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", value)


def test_web_chat_streams_folds_reasoning_and_stops(browser, tmp_path_factory, monkeypatch):
    page, expect = browser
    ARTIFACTS.mkdir(exist_ok=True)
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)

    # 1. a conversation: the reply streams in token by token
    with served(checkpoint(tmp_path_factory, "chat")) as (url, engine):
        slow_down(engine, monkeypatch, 0.03)
        page.goto(url + "/")
        expect(page.locator("#model")).to_contain_text(MODEL)
        page.fill("#system", "Du bisch en Bärner.")
        set_range(page, "#temperature", "0")
        page.evaluate(RECORD)
        page.fill("#prompt", "Grüezi mitenand")
        page.press("#prompt", "Enter")
        expect(page.locator(".msg.user .content")).to_have_text("Grüezi mitenand")
        expect(page.locator(".msg.assistant .content").last).to_have_text(REPLY, timeout=20_000)
        seen = [s for s in dict.fromkeys(page.evaluate("window.seen")) if s]
        assert len(seen) >= 3 and all(REPLY.startswith(s) for s in seen), seen  # growing prefixes: streamed
        expect(page.locator("#stats")).to_contain_text("tokens")
        page.screenshot(path=str(ARTIFACTS / "web_chat.png"))
        page.fill("#prompt", "No chli meh")  # the second turn sends the first one back
        page.click("#send")
        expect(page.locator(".msg.assistant .content")).to_have_text([REPLY, REPLY], timeout=20_000)
    first, second = bodies[-2:]
    assert first["stream"] is True and first["temperature"] == 0 and first["model"] == MODEL
    assert first["messages"] == [{"role": "system", "content": "Du bisch en Bärner."},
                                 {"role": "user", "content": "Grüezi mitenand"}]
    assert second["messages"][2:] == [{"role": "assistant", "content": REPLY},
                                      {"role": "user", "content": "No chli meh"}]

    # 2. thinking on: the reasoning is shown folded above the answer (here a tool call)
    with served(checkpoint(tmp_path_factory, "tools")) as (url, engine):
        page.goto(url + "/")
        expect(page.locator("#model")).to_contain_text(MODEL)
        set_range(page, "#temperature", "0")
        page.check("#thinking")
        page.fill("#prompt", "Weather in Bern?")
        page.click("#send")
        box = page.locator("details.reasoning")
        expect(box.locator(".reasoning-text")).to_have_text(THOUGHT, timeout=20_000)
        expect(page.locator(".tool-call")).to_contain_text("get_weather")
        assert box.get_attribute("open") is None  # folded
        box.locator("summary").click()
        expect(box).to_have_attribute("open", "")
        page.screenshot(path=str(ARTIFACTS / "web_reasoning.png"))
    assert bodies[-1]["chat_template_kwargs"] == {"enable_thinking": True}

    # 3. Stop: the browser aborts the stream and the server cancels the generation
    with served(checkpoint(tmp_path_factory, "random")) as (url, engine):
        slow_down(engine, monkeypatch, 0.03)
        page.goto(url + "/")
        expect(page.locator("#model")).to_contain_text(MODEL)
        page.fill("#max_tokens", "400")
        page.fill("#prompt", "Talk for a long time")
        page.click("#send")
        expect(page.locator(".msg.assistant .content")).not_to_have_text("", timeout=20_000)
        page.click("#stop")
        expect(page.locator(".msg.assistant.stopped")).to_have_count(1)
        expect(page.locator("#send")).to_be_visible()
        assert wait_idle(engine)
        metrics = httpx.get(url + "/metrics").text
        assert 'apertus_generations_total{finish_reason="cancelled"} 1.0' in metrics
        page.screenshot(path=str(ARTIFACTS / "web_stopped.png"))
