"""GSM8K and MGSM: greedy generation through the inference engine, exact match on the final number.

Base models get lm-eval's GSM8K format, few-shot: "Question: ...\\nAnswer: <worked solution> #### N" exemplars from
the GSM8K train split, then the test question; generation stops at "Question:" or a blank line. Instruct models get
the same exemplars as a multi-turn chat (user question, assistant solution), as the Apertus report's "8-shot CoT
multi-turn" protocol, rendered with the Apertus chat format and stopped at the chat stop tokens. MGSM asks its
question in each of its 11 languages after the same English exemplars (the "EN-CoT" setting of Shi et al. 2022; the
native exemplars of the MGSM repository are not part of the embedded data/mgsm).

Two scores, exactly as lm-eval's GSM8K task: `exact_match` takes the last number-like match of the reply
("flexible-extract"), `strict_match` the number after "####"; both compare as strings after removing ",", "$",
everything up to "#### " and a final ".", ignoring case.
"""

from __future__ import annotations

import json
import random
import re

from ..chat import STOP_IDS, encode_chat
from ..util import read_jsonl
from . import tasks as T

MGSM_LANGS = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")  # lm-eval gsm8k.yaml regexes_to_ignore
INVALID = "[invalid]"
BASE_STOP = ["Question:", "\n\n"]
CHAT_DATE = "2025-09-02"  # the chat format's system message carries a date: fixed, so prompts are reproducible


def gsm8k_docs(split: str = "test", root=None) -> list[dict]:
    rows = list(read_jsonl(T.corpus_root(root) / "gsm8k" / f"{split}.jsonl"))
    return [{"question": r["question"], "solution": r["answer"], "target": r["answer"].split("####")[-1].strip()}
            for r in rows]


def mgsm_docs(lang: str, root=None) -> list[dict]:
    with open(T.corpus_root(root) / "mgsm" / f"mgsm_{lang}.tsv", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return [{"question": q, "target": a} for q, a in rows]


def fewshot(k: int, root=None, seed: int = 1234) -> list[dict]:
    """k exemplars drawn from the GSM8K train split with a fixed seed (the same for every question and model)."""
    train = gsm8k_docs("train", root)
    return random.Random(seed).sample(train, k) if k else []


def base_prompt(question: str, shots: list[dict]) -> str:
    parts = [f"Question: {s['question']}\nAnswer: {s['solution']}\n\n" for s in shots]
    return "".join(parts) + f"Question: {question}\nAnswer:"


def chat_messages(question: str, shots: list[dict]) -> list[dict]:
    msgs = []
    for s in shots:
        msgs += [{"role": "user", "content": s["question"]}, {"role": "assistant", "content": s["solution"]}]
    return msgs + [{"role": "user", "content": question}]


def normalize(answer: str) -> str:
    """lm-eval's GSM8K exact_match: drop ",", "$", everything up to "#### " and a final "."; case-insensitive."""
    for pattern in IGNORE:
        answer = re.sub(pattern, "", answer)
    return answer.lower()


def extract(reply: str) -> tuple[str, str]:
    """(flexible: the last number-like match, strict: the first number after '####'), as lm-eval's regex filters
    take them ("[invalid]" when there is none)."""
    flexible = FLEXIBLE.findall(reply)
    flexible = next((g for g in flexible[-1] if g), INVALID).strip() if flexible else INVALID
    strict = STRICT.findall(reply)
    return flexible, strict[0].strip() if strict else INVALID


def score(docs: list[dict], replies: list[str]) -> tuple[dict, list[dict]]:
    """Metrics (exact_match, strict_match with stderr; chance 0) and one sample record per document."""
    em, strict, samples = [], [], []
    for d, reply in zip(docs, replies, strict=True):
        flex, st = extract(reply)
        target = normalize(d["target"])
        em.append(float(normalize(flex) == target))
        strict.append(float(normalize(st) == target))
        samples.append({"question": d["question"], "target": d["target"], "reply": reply, "extracted": flex,
                        "correct": bool(em[-1])})
    out = {"n": len(docs), "chance": 0.0, "exact_match": T.mean(em), "exact_match_stderr": T.mean_stderr(em),
           "strict_match": T.mean(strict), "strict_match_stderr": T.mean_stderr(strict)}
    return out, samples


def run_gen(generate, subtasks: dict, *, chat: bool, tokenizer, limit: int | None = None, num_fewshot: int = 8,
            max_tokens: int = 384, root=None) -> tuple[dict, dict]:
    """All generative subtasks in one batched `generate(prompt_ids_list, max_tokens, stop, stop_ids) -> [text]` call.

    Returns ({subtask: metrics}, {subtask: samples})."""
    shots = fewshot(num_fewshot, root)
    docs = {}
    for name, (group, kind, lang) in subtasks.items():
        if kind == "gen":
            docs[name] = (gsm8k_docs("test", root) if group == "gsm8k" else mgsm_docs(lang, root))[:limit]
    prompts = []
    for ds in docs.values():
        for d in ds:
            if chat:
                prompts.append(encode_chat(tokenizer, chat_messages(d["question"], shots), add_generation_prompt=True,
                                           date=CHAT_DATE)[0])
            else:
                prompts.append(tokenizer.encode(base_prompt(d["question"], shots), bos=True))
    stop_ids = list(STOP_IDS) if chat else [tokenizer.eos_id]
    replies = iter(generate(prompts, max_tokens, None if chat else BASE_STOP, stop_ids))
    results, samples = {}, {}
    for name, ds in docs.items():
        results[name], samples[name] = score(ds, [next(replies) for _ in ds])
    return results, samples


def engine_generate(engine):
    """`generate` for run_gen on an `apertus.infer.engine.Engine`: greedy, its shared sampler, batched."""
    from ..infer.engine import SamplingParams

    def generate(prompts: list[list[int]], max_tokens: int, stop: list[str] | None, stop_ids: list[int]) -> list[str]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=stop, stop_token_ids=stop_ids,
                                skip_special_tokens=True)
        return [r.result().text for r in engine.generate(prompts, params)]

    return generate


def write_samples(path, samples: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for name, rows in samples.items():
            for row in rows:
                f.write(json.dumps({"task": name, **row}, ensure_ascii=False) + "\n")
