"""Training pairs for preference alignment: a prompt's candidate pool and the rule that picks chosen and rejected.

The pool: the n on-policy reference samples of π_ref, plus off-policy candidates when the recipe names some (Apertus
drew them from several external models):
    [data] dataset_candidates = true   the dataset's own answers (the reference answer, orca's rejected one,
                                       meta.candidates)
    [data] candidates_column = "name"  a field of each prompt row: a completion or a list of them
    [data] candidates_file = "x.jsonl" completions per prompt: {"index": i, "completions": [text or {"text",
                                       "finish_reason"}, ...]}, i = the prompt's position in [data] prompts
Every completion is scored against the reference samples: its quantile reward is the share of the reference rewards
<= its reward.

The rule ([pairs] rule):
    "on-policy"  the best and the worst completion of the pool (with no off-policy candidates the chosen quantile is
                 always 1.0 and the rejected 1/n)
    "apertus"    as Apertus built them: chosen beats every on-policy sample (its reward is above the best reference
                 reward) and ended its turn (a completion cut off by max_tokens is never chosen); rejected lies below
                 the `rejected_quantile` percentile of the reference rewards (linear interpolation, numpy's default).
                 Of several such completions the best is chosen and the worst rejected; a prompt without both gives
                 no pair ("no_chosen" / "no_rejected").
Empty completions are scored but never trained on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

RULES = ("on-policy", "apertus")


@dataclass
class Pairs:
    rule: str = "on-policy"  # "on-policy" | "apertus" (above)
    rejected_quantile: float = 0.2  # apertus: rejected lies below this percentile of the reference rewards


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of values, interpolating linearly between order statistics."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def choose_pair(rec: dict, pool: list[dict], pairs: Pairs | None = None) -> str | None:
    """Set each completion's quantile reward against rec["ref_rewards"], then rec["chosen"] and rec["rejected"] by
    the rule; returns None, or why the prompt gives no pair."""
    pairs = pairs or Pairs()
    ref = rec["ref_rewards"]
    for c in pool:
        c["quantile"] = sum(r <= c["reward"] for r in ref) / len(ref)
    usable = [c for c in pool if c["text"].strip()]
    if not usable:
        return "empty_completion"
    if pairs.rule == "on-policy":
        best = max(usable, key=lambda c: c["reward"])
        worst = min(usable, key=lambda c: c["reward"])
        if best["reward"] <= worst["reward"]:
            return "no_signal"
    else:
        top, cut = max(ref), percentile(ref, pairs.rejected_quantile)
        winners = [c for c in usable if c["reward"] > top and c.get("finish_reason") != "length"]
        losers = [c for c in usable if c["reward"] < cut]
        if not winners:
            return "no_chosen"
        if not losers:
            return "no_rejected"
        best, worst = max(winners, key=lambda c: c["reward"]), min(losers, key=lambda c: c["reward"])
    rec["chosen"], rec["rejected"] = best, worst
    return None


def read_candidate_file(path: str | Path) -> dict[int, list[dict]]:
    """{prompt index: [{"text", "finish_reason"}]} of a candidates JSONL file (several lines may name one prompt)."""
    out: dict[int, list[dict]] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items = [as_candidate(c) for c in row["completions"]]
            out.setdefault(int(row["index"]), []).extend(items)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{n}: expected {{\"index\": int, \"completions\": [text or {{\"text\": ...}}]}}"
                             f" ({e})") from None
    return out


def as_candidate(c, source: str = "file") -> dict:
    """A candidate completion {"text", "finish_reason", "source"} from a text or a dict with "text"."""
    if isinstance(c, str):
        return {"text": c, "finish_reason": "stop", "source": source}
    if isinstance(c, dict) and isinstance(c.get("text"), str):
        return {"text": c["text"], "finish_reason": c.get("finish_reason", "stop"), "source": source}
    raise TypeError(f"a candidate must be a text or {{\"text\": ...}}, got {c!r}")


def column_candidates(meta: dict, column: str) -> list[dict]:
    """The completions in a prompt row's field `column` (a text or a list of texts); [] when absent."""
    value = meta.get(column) if column else None
    if value is None:
        return []
    return [as_candidate(c, "column") for c in (value if isinstance(value, list) else [value])]
