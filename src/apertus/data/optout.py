"""Retroactive robots.txt opt-out (docs/recipe.md §5): a document is dropped when its URL is disallowed, in the
robots.txt snapshot of its host, for any AI crawler agent Apertus honoured (or for `*`). No snapshot for a host = keep.
Parsing is done by `protego` (the parser the Apertus pipeline used)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from datatrove.pipeline.filters.base_filter import BaseFilter
from protego import Protego

# swiss-ai/pretrain-data robots_filter.py `_DEFAULT_REMOVE_USER_AGENTS` (docs/recipe.md §5 lists the same,
# FacebookBot in code).
AI_AGENTS = ("AI2Bot", "Applebot-Extended", "Bytespider", "CCBot", "CCBot/2.0", "CCBot/1.0", "ClaudeBot",
             "cohere-training-data-crawler", "Diffbot", "FacebookBot", "Meta-ExternalAgent", "Google-Extended",
             "GPTBot", "PanguBot", "*")


@lru_cache(maxsize=65536)
def _parse(robots_txt: str) -> Protego | None:
    try:
        return Protego.parse(robots_txt)
    except Exception:  # an unparsable file is treated like a missing one: keep (Apertus did the same)
        return None


def disallowed_agents(url: str, robots_txt: str | None, agents=AI_AGENTS) -> list[str]:
    """The agents in `agents` that may not fetch `url` under `robots_txt` (None/unparsable: none)."""
    if robots_txt is None:
        return []
    parser = _parse(robots_txt)
    if parser is None:
        return []
    out = []
    for agent in agents:
        try:
            if not parser.can_fetch(url, agent):
                out.append(agent)
        except Exception:  # a URL protego cannot handle: permissive, as Apertus
            pass
    return out


def disallowed(url: str, robots_txt: str | None) -> bool:
    """True when any AI crawler agent of docs/recipe.md §5, or `*`, may not fetch `url` according to `robots_txt`."""
    return bool(disallowed_agents(url, robots_txt))


def host_of(url: str) -> str:
    """The host a robots.txt applies to: lower-case netloc without credentials (port kept, as robots.txt is per
    origin)."""
    netloc = urlsplit(url).netloc.lower()
    return netloc.rsplit("@", 1)[-1]


def load_robots(path: str | Path) -> dict[str, str]:
    """robots.txt snapshots: a folder of `<host>.txt` / `<host>/robots.txt` files, or a JSONL file of
    {"domain": ..., "robots_txt": ...} lines. Returns {host: robots text}."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: robots.txt snapshots not found")
    robots: dict[str, str] = {}
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.is_dir() and (f / "robots.txt").is_file():
                robots[f.name.lower()] = (f / "robots.txt").read_text(encoding="utf-8", errors="replace")
            elif f.suffix == ".txt":
                robots[f.stem.lower()] = f.read_text(encoding="utf-8", errors="replace")
        return robots
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            robots[str(row["domain"]).lower()] = row["robots_txt"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected {{\"domain\": ..., \"robots_txt\": ...}} ({e})") from None
    return robots


class RobotsOptOut(BaseFilter):
    """Drops documents whose `metadata["url"]` is disallowed for an AI agent; records which agents in metadata."""

    name = "robots.txt opt-out"

    def __init__(self, robots: dict[str, str], agents=AI_AGENTS):
        super().__init__()
        self.robots = robots
        self.agents = tuple(agents)

    def filter(self, doc) -> bool | tuple[bool, str]:
        url = doc.metadata.get("url")
        if not url:
            return True
        agents = disallowed_agents(url, self.robots.get(host_of(url)), self.agents)
        if agents:
            doc.metadata["disallowed_agents"] = agents
            return False, "robots_disallowed"
        return True
