"""Memorization probes (the role of Apertus's Gutenberg probes, docs/recipe.md §5): passages cut from a text the rest of
the corpus does not contain, inserted into a host source's training stream with controlled exposure counts
(`exposures`, e.g. 1, 4, 16, 64 copies each), plus unexposed controls from the same text. Everything is recorded in
`probes.jsonl` of the built dataset, so an evaluation can compare memorization of exposed vs control passages."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def make_probes(text_path: str, exposures=(1, 4, 16, 64), per_exposure: int = 4, controls: int = 16,
                chars: int = 400, seed: int = 0) -> list[dict]:
    """Deterministic probe passages: lines of `text_path` packed into passages of about `chars` characters, drawn
    without replacement; the first `per_exposure` for each exposure count, then `controls` with exposure 0."""
    p = Path(text_path)
    if not p.is_file():
        raise FileNotFoundError(f"probes: {text_path} not found")
    passages, cur = [], []
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            cur.append(line)
        if sum(map(len, cur)) >= chars:
            passages.append("\n".join(cur))
            cur = []
    need = per_exposure * len(exposures) + controls
    if len(passages) < need:
        raise ValueError(f"probes: {text_path} gives {len(passages)} passages of {chars} chars, {need} needed")
    pick = np.random.default_rng(seed).choice(len(passages), size=need, replace=False)
    counts = [e for e in exposures for _ in range(per_exposure)] + [0] * controls
    return [{"id": f"probe-{i:04d}", "text": passages[j], "exposure": int(e), "control": e == 0,
             "sha256": hashlib.sha256(passages[j].encode()).hexdigest()}
            for i, (j, e) in enumerate(zip(pick, counts, strict=True))]
