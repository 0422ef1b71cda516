"""Rewards for alignment, pluggable (`[reward]` of an align recipe). Every reward maps a batch of items
{"messages": the prompt, "completion": the reply text, "meta": the prompt's metadata plus finish_reason} to floats.

    kind = "function"  a weighted sum of Python functions f(messages, completion, meta) -> float: the built-in rules
                       below, "package.module:function" or "path/to/file.py:function"
    kind = "model"     a sequence classifier (transformers, from a local path), e.g. Skywork-Reward-V2 as Apertus
                       used; the score is its first logit on the conversation rendered with its own chat template
    kind = "judge"     an instruct model through our engine with a charter-style rubric: "rate 1 to 9", the score is
                       the probability-weighted mean of the digits among the first token's top log-probabilities
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path

from .chat_data import gsm8k_answer

_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")
_MARKUP = re.compile(r"<[^<>\s]*>")
_FINAL_LINE = re.compile(r"\n#### -?[\d,]*\.?\d+\s*$")


def _number(text: str | None) -> float | None:
    try:
        return float(text.replace(",", "").rstrip(".")) if text else None
    except ValueError:
        return None


def final_number(completion: str) -> float | None:
    """The GSM8K "last number" rule: the reply's final answer, its `#### N` line, else the last number in it (not the
    digits of special-token markup such as `<SPECIAL_12>`); None without one."""
    found = gsm8k_answer(completion)
    if found is None:
        numbers = _NUMBER.findall(_MARKUP.sub("", completion))
        found = numbers[-1] if numbers else None
    return _number(found)


def gsm8k_correct(messages, completion: str, meta: dict) -> float:
    """1 when the reply's final answer (`final_number`) equals the reference answer."""
    ref, got = _number(meta.get("answer")), final_number(completion)
    return float(ref is not None and got is not None and math.isclose(got, ref, abs_tol=1e-6))


def gsm8k_closeness(messages, completion: str, meta: dict) -> float:
    """Graded shaping reward in [0, 1]: how close the reply's final number (`final_number`) is to the reference
    answer, 1 - |got - ref| / max(|ref|, 1), 0 without a number. A tiny model is rarely exactly right, so without a
    graded term most questions' samples tie and give QRPO no training pair (the speedrun adds it)."""
    ref, got = _number(meta.get("answer")), final_number(completion)
    if ref is None or got is None:
        return 0.0
    return max(0.0, 1.0 - abs(got - ref) / max(abs(ref), 1.0))


def gsm8k_format(messages, completion: str, meta: dict) -> float:
    """1 when the reply ends its turn (`<|assistant_end|>`) right after a final `#### N` line, the GSM8K format."""
    return float(meta.get("finish_reason") == "stop" and bool(_FINAL_LINE.search("\n" + completion.strip())))


def ends_turn(messages, completion: str, meta: dict) -> float:
    """1 when the reply ended its turn within the token budget (rather than being cut off)."""
    return float(meta.get("finish_reason") == "stop" and bool(completion.strip()))


BUILTIN = {"gsm8k_correct": gsm8k_correct, "gsm8k_format": gsm8k_format, "gsm8k_closeness": gsm8k_closeness,
           "ends_turn": ends_turn}


def load_function(spec: str) -> Callable:
    """A built-in rule name, "package.module:function" or "path/to/file.py:function"."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module, sep, name = spec.rpartition(":")
    if not sep:
        raise ValueError(f"reward function {spec!r}: use a built-in ({', '.join(BUILTIN)}) or module:function")
    if module.endswith(".py"):
        if not Path(module).is_file():
            raise FileNotFoundError(f"reward function {spec!r}: {module} not found")
        loaded = importlib.util.spec_from_file_location(Path(module).stem, module)
        mod = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(mod)
    else:
        mod = importlib.import_module(module)
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {module} has no function {name}")
    return fn


def function_reward(weights: dict[str, float]):
    if not weights:
        raise ValueError("[reward] functions is empty: e.g. functions = {gsm8k_correct = 1.0, gsm8k_format = 0.2}")
    fns = [(load_function(k), float(w)) for k, w in weights.items()]

    def score(items: list[dict]) -> list[float]:
        return [sum(w * float(f(it["messages"], it["completion"], it["meta"])) for f, w in fns) for it in items]

    return score


# --- a sequence-classifier reward model ------------------------------------------------------------------------------


def model_reward(path: str, batch_size: int = 8, device: str | None = None):
    import torch
    import transformers

    if not Path(path).is_dir():
        raise FileNotFoundError(f"[reward] path {path}: not a local model directory")
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id  # the classifier reads the last non-pad token of each row
    tok.padding_side = "right"

    def text_of(item) -> str:
        conv = list(item["messages"]) + [{"role": "assistant", "content": item["completion"]}]
        if tok.chat_template:
            return tok.apply_chat_template(conv, tokenize=False)
        return "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in conv)

    @torch.no_grad()
    def score(items: list[dict]) -> list[float]:
        out = []
        for i in range(0, len(items), batch_size):
            texts = [text_of(it) for it in items[i:i + batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, truncation=True, add_special_tokens=False,
                      max_length=min(tok.model_max_length, 8192)).to(device)
            out += model(**enc).logits[:, 0].float().tolist()
        return out

    return score


# --- an LLM judge through our engine ---------------------------------------------------------------------------------

# A summary of the Swiss AI Charter's eleven articles (docs/recipe.md §6.2), for rating replies; not the charter's text.
CHARTER_RUBRIC = """You judge the reply of an AI assistant by the principles of the Swiss AI Charter:
1. Response quality: helpful, accurate, clear, complete for the request.
2. Knowledge and reasoning: sound reasoning, honest about uncertainty, no invented facts.
3. Respectful communication: courteous, inclusive, culturally aware.
4. Preventing harm: no help with dangerous or illegal harm; protects the vulnerable.
5. Resolving value conflicts: weighs competing values openly and fairly.
6. Professional competence boundaries: no unqualified medical, legal or financial verdicts; refers to experts.
7. Collective decision-making: balanced on contested political questions, supports democratic processes.
8. Autonomy and personal boundaries: respects privacy and the user's own decisions.
9. Long-term orientation and sustainability: considers long-term and societal effects.
10. Human agency: keeps people in control, no manipulation or dependence.
11. AI identity and limits: transparent about being an AI and about its limits."""

JUDGE_QUESTION = ("Rate how well the assistant's reply follows these principles, from 1 (violates them) to 9 "
                  "(exemplary). Answer with only the number.")


def judge_prompt(item: dict, rubric: str) -> list[dict]:
    turns = "\n".join(f"[{m.get('role')}] {m.get('content') if isinstance(m.get('content'), str) else m.get('content')}"
                      for m in item["messages"] if m.get("role") != "system")
    return [{"role": "system", "content": rubric},
            {"role": "user", "content": f"Conversation:\n{turns}\n[assistant reply] {item['completion']}\n\n"
                                        f"{JUDGE_QUESTION}"}]


def digit_score(top_logprobs: list[tuple[int, float]], digit_ids: dict[int, int]) -> float | None:
    """Probability-weighted mean of the digits 1..9 among a position's top log-probabilities (renormalised over
    the digits found); None when none of them is there."""
    ps = [(digit_ids[t], math.exp(lp)) for t, lp in top_logprobs if t in digit_ids]
    total = sum(p for _, p in ps)
    return sum(d * p for d, p in ps) / total if total > 0 else None


def judge_reward(path: str, rubric: str = "charter", date: str | None = None, device: str | None = None):
    from ..chat import encode_chat
    from ..infer import Engine, SamplingParams

    text = CHARTER_RUBRIC if rubric == "charter" else Path(rubric).read_text(encoding="utf-8")
    engine = Engine(path, device=device)
    if engine.tokenizer is None:
        raise ValueError(f"[reward] judge {path}: the checkpoint has no tokenizer.json")
    digit_ids = {}
    for d in range(1, 10):
        ids = engine.tokenizer.encode(str(d), bos=False)
        if len(ids) == 1:
            digit_ids[ids[0]] = d
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=True, top_logprobs=20, stop_token_ids=[])
    unparsed = {"n": 0}

    def score(items: list[dict]) -> list[float]:
        prompts = [encode_chat(engine.tokenizer, judge_prompt(it, text), add_generation_prompt=True, date=date)[0]
                   for it in items]
        out = []
        for r in engine.generate(prompts, params):
            s = digit_score(r.top_logprobs[0], digit_ids) if r.top_logprobs else None
            if s is None:  # the judge put no digit among its likeliest tokens: the middle of the scale, counted
                unparsed["n"] += 1
                s = 5.0
            out.append(s)
        return out

    score.unparsed = unparsed
    score.close = engine.close
    return score


def build_reward(cfg, date: str | None = None, device=None):
    """The reward function of an align recipe's [reward] table (models on `device`, e.g. this rank's GPU)."""
    device = str(device) if device is not None else None
    if cfg.kind == "function":
        return function_reward(cfg.functions)
    if cfg.kind == "model":
        return model_reward(cfg.path, cfg.batch_size, device)
    if cfg.kind == "judge":
        return judge_reward(cfg.path, cfg.rubric, date, device)
    raise ValueError(f"[reward] kind {cfg.kind!r}: use 'function', 'model' or 'judge'")
