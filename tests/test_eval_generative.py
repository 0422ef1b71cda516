"""GSM8K / MGSM: prompts, answer extraction against lm-eval's filters and metric, scoring of known replies."""

import random

import pytest

from apertus.chat import render
from apertus.eval import generative as G
from apertus.eval import suite
from apertus.tokenizer import Tokenizer

REPLIES = ["Natalia sold 48/2 = 24 clips in May.\n#### 72", "So she makes $18 every day.", "The answer is 1,200.",
           "#### 3.50", "no number here", "It is 42... or 7", "$5,600.", "####  12", "-3 degrees", "25.0 eggs"]


def test_extraction_and_exact_match_are_lm_evals():
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    flexible = RegexFilter(G.FLEXIBLE.pattern, group_select=-1).apply([[r] for r in REPLIES], None)
    strict = RegexFilter(G.STRICT.pattern).apply([[r] for r in REPLIES], None)
    assert [G.extract(r) for r in REPLIES] == [(f[0], s[0]) for f, s in zip(flexible, strict, strict=True)]
    targets = ["72", "18", "1200", "3.50", "1", "7", "5600", "12", "-3", "25"]
    theirs = [exact_match_hf_evaluate([f[0]], [t], regexes_to_ignore=list(G.IGNORE), ignore_case=True)["exact_match"]
              for f, t in zip(flexible, targets, strict=True)]
    ours, _ = G.score([{"question": "", "target": t} for t in targets], REPLIES)
    assert ours["exact_match"] == pytest.approx(sum(theirs) / len(theirs)) and 0 < ours["exact_match"] < 1


def test_data_and_prompts(data_dir):
    test = G.gsm8k_docs("test", data_dir)
    assert len(test) == 1319 and test[0]["target"] == "18"
    assert [len(G.mgsm_docs(lang, data_dir)) for lang in G.MGSM_LANGS] == [250] * 11
    assert G.mgsm_docs("de", data_dir)[0]["target"] == "18"  # parallel with GSM8K test
    shots = G.fewshot(8, data_dir)
    assert len(shots) == 8 and shots == G.fewshot(8, data_dir)  # fixed for every question and model
    prompt = G.base_prompt("How many?", shots)
    assert prompt.count("Question: ") == 9 and prompt.endswith("Question: How many?\nAnswer:")
    assert f"Answer: {shots[0]['solution']}\n\nQuestion: " in prompt
    text = render(G.chat_messages("How many?", shots), add_generation_prompt=True, date=G.CHAT_DATE)
    assert text.count("<|user_start|>") == 9 and text.count("<|assistant_end|>") == 8
    assert text.endswith("How many?<|user_end|><|assistant_start|>") and G.CHAT_DATE in text


@pytest.mark.parametrize("chat", [False, True])
def test_run_gen_scores_known_replies(chat, data_dir, apertus_tokenizer_json):
    """A generator that knows the answers scores 100%, one that answers at random ~0%; the prompts it receives
    are the ones the format asks for."""
    tok = Tokenizer.from_file(apertus_tokenizer_json)
    subtasks = suite.resolve(["gsm8k", "mgsm_de", "mgsm_ja"], root=data_dir)
    seen = []

    def oracle(prompts, max_tokens, stop, stop_ids):
        seen.append((prompts, stop, stop_ids))
        answers = [d["target"] for d in G.gsm8k_docs("test", data_dir)[:5]]
        answers += [d["target"] for lang in ("de", "ja") for d in G.mgsm_docs(lang, data_dir)[:5]]
        return [f"Let me think. 3 + 4 = 7.\n#### {a}" for a in answers]

    results, samples = G.run_gen(oracle, subtasks, chat=chat, tokenizer=tok, limit=5, root=data_dir)
    assert {name: r["exact_match"] for name, r in results.items()} == {"gsm8k": 1.0, "mgsm_de": 1.0, "mgsm_ja": 1.0}
    assert all(r["strict_match"] == 1.0 and r["chance"] == 0.0 for r in results.values())
    prompts, stop, stop_ids = seen[0]
    text = tok.decode(prompts[5])
    assert "Janets Enten legen 16 Eier" in text and text.startswith("<s>")
    if chat:
        assert stop is None and stop_ids == [2, 68, 72] and text.endswith("<|assistant_start|>")
        assert prompts[5] == tok.encode(render(G.chat_messages(G.mgsm_docs("de", data_dir)[0]["question"],
                                                               G.fewshot(8, data_dir)),
                                               add_generation_prompt=True, date=G.CHAT_DATE), bos=False)
    else:
        assert stop == G.BASE_STOP and stop_ids == [tok.eos_id] and text.endswith("\nAnswer:")
    rng = random.Random(0)
    results, _ = G.run_gen(lambda p, *a: [f"#### {rng.randrange(10**6, 10**7)}" for _ in p], subtasks, chat=chat,
                           tokenizer=tok, limit=5, root=data_dir)
    assert all(r["exact_match"] == 0.0 for r in results.values())
    assert samples["mgsm_ja"][0]["correct"] is True


def test_generation_through_the_engine_is_greedy_transformers(tmp_path, data_dir):
    """`apertus eval MODEL --tasks gsm8k,mgsm_de`: the replies are transformers' greedy continuations of the
    few-shot prompts, cut at the stop strings; results.json, results.md and samples.jsonl are written."""
    import dataclasses
    import json

    import torch
    import transformers

    from apertus import build_model, preset, save_model
    from apertus.tokenizer import tiny_tokenizer

    tok = tiny_tokenizer(tmp_path / "tok")
    cfg = dataclasses.replace(preset("tiny"), vocab_size=2048, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    save_model(build_model(cfg, seed=0), tmp_path / "m", extra_files={"tokenizer.json": tok.inner.to_str()})
    report = suite.evaluate(tmp_path / "m", ["gsm8k", "mgsm_de"], limit=2, num_fewshot=2, max_tokens=24,
                            out=tmp_path / "out", progress=False, device="cpu")
    assert report["config"]["chat"] is False and set(report["tasks"]) == {"gsm8k", "mgsm_de"}
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    shots = G.fewshot(2, data_dir)
    for s in samples:
        ids = tok.encode(G.base_prompt(s["question"], shots), bos=True)
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_id)
        text = tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
        for stop in G.BASE_STOP:
            text = text.split(stop)[0]
        assert s["reply"] == text
