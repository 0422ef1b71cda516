"""Retroactive robots.txt opt-out: fixture hosts with robots.txt snapshots (GPTBot disallowed, `*` disallowed on a
path, allow-all, a non-AI agent only, CCBot on a path, no file) -> exactly the right documents removed."""

import json

import pytest
from datatrove.data import Document

from apertus.data.optout import AI_AGENTS, RobotsOptOut, disallowed, load_robots
from apertus.data.steps import Funnel, Tracked

ROBOTS = {
    "gpt.example": "User-agent: GPTBot\nDisallow: /\n",
    "star.example": "User-agent: *\nDisallow: /private/\n",
    "allow.example": "User-agent: *\nAllow: /\n",
    "google.example": "User-agent: Googlebot\nDisallow: /\n",
    "cc.example": "User-agent: CCBot\nDisallow: /docs/\n",
    "mixed.example": "User-agent: *\nDisallow: /\n\nUser-agent: GPTBot\nAllow: /\n",
}
# url -> removed?
URLS = {
    "https://gpt.example/": True, "https://gpt.example/a/b.html": True,
    "https://star.example/private/x": True, "https://star.example/public/x": False, "https://star.example/": False,
    "https://allow.example/anything": False,
    "https://google.example/page": False,  # only a search crawler is disallowed: not an AI agent
    "https://cc.example/docs/1": True, "http://CC.example/docs/2?q=1": True, "https://cc.example/blog": False,
    "https://mixed.example/x": True,  # `*` is disallowed (GPTBot itself is allowed): Apertus counts `*`
    "https://missing.example/x": False,  # no robots.txt: keep
}


def test_disallowed_function():
    for url, removed in URLS.items():
        host = url.split("/")[2].lower()
        assert disallowed(url, ROBOTS.get(host)) is removed, url
    assert not disallowed("https://a.example/x", None)
    assert "GPTBot" in AI_AGENTS and "*" in AI_AGENTS and len(AI_AGENTS) == 15


def test_filter_removes_exactly_the_disallowed_documents():
    funnel = Funnel()
    docs = [Document(text=f"doc {i}", id=str(i), metadata={"url": u, "source": "web", "kind": "web", "n_tokens": 3})
            for i, u in enumerate(URLS)]
    docs.append(Document(text="no url", id="nourl", metadata={"source": "web", "kind": "web"}))
    kept = list(Tracked(RobotsOptOut(ROBOTS), "optout", funnel)(docs))
    assert {d.metadata.get("url") for d in kept} == {u for u, r in URLS.items() if not r} | {None}
    removed = sum(URLS.values())
    assert funnel.counts[("web", "und", "optout:robots_disallowed")][:2] == [removed, 3 * removed]
    gpt = next(d for d in docs if d.metadata.get("url") == "https://gpt.example/")
    assert gpt.metadata["disallowed_agents"] == ["GPTBot"]


@pytest.mark.parametrize("layout", ["folder", "nested", "jsonl"])
def test_load_robots_snapshots(tmp_path, layout):
    if layout == "folder":
        for host, text in ROBOTS.items():
            (tmp_path / f"{host}.txt").write_text(text)
        src = tmp_path
    elif layout == "nested":
        for host, text in ROBOTS.items():
            (tmp_path / host).mkdir()
            (tmp_path / host / "robots.txt").write_text(text)
        src = tmp_path
    else:
        src = tmp_path / "robots.jsonl"
        src.write_text("".join(json.dumps({"domain": h, "robots_txt": t}) + "\n" for h, t in ROBOTS.items()))
    assert load_robots(src) == ROBOTS


def test_load_robots_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_robots(tmp_path / "nope")
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"domain": "a"}\n')
    with pytest.raises(ValueError, match="r.jsonl:1"):
        load_robots(bad)
