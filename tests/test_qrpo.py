"""QRPO and DPO: the loss against hand computations of docs/recipe.md §6.2 (both log Z branches, the clamp), the
direction of its gradients on a real model, quantile rewards and pair choice, rewards (rules, Python functions, a
transformers reward model, the engine judge), and alignment end to end on CPU (mean held-out reward up after QRPO)."""

import json
import math

import posttrain_helpers as ph
import pytest
import torch

from apertus.train.pairs import Pairs, choose_pair, percentile, read_candidate_file
from apertus.train.qrpo import beta_log_z, dpo_losses, pair_batch, qrpo_loss, qrpo_losses, sequence_logps
from apertus.train.rewards import (
    digit_score,
    function_reward,
    gsm8k_closeness,
    gsm8k_correct,
    gsm8k_format,
    load_function,
)


def by_hand(r_q, logp, ref_logp, length, beta=5.0, max_beta=0.1):
    """docs/recipe.md §6.2 for one completion, in plain floats: β_y = β/|y| clamped at max_beta; β log Z = β log β + 1
    when β <= 0.2, else β log β + β log(e^{1/β} − 1)."""
    b = beta / length
    if max_beta is not None:
        b = min(b, max_beta)
    blz = b * math.log(b) + 1 if b <= 0.2 else b * math.log(b) + b * math.log(math.exp(1 / b) - 1)
    return (r_q - blz - b * (logp - ref_logp)) ** 2


def test_qrpo_loss_equals_hand_computation_on_both_log_z_branches_and_the_clamp():
    # |y| = 10: β/|y| = 0.5 clamped to 0.1, approximate branch: (0.8 - (0.1 ln 0.1 + 1) - 0.1·3)² = 0.0727605
    # |y| = 100: 0.05, unclamped, approximate branch: (0.3 - 0.8502134 - 0.05·(-2))² = 0.2026921
    pol, ref = torch.tensor([-12.0, -40.0]), torch.tensor([-15.0, -38.0])
    rq, n = torch.tensor([0.8, 0.3]), torch.tensor([10.0, 100.0])
    loss = qrpo_loss(pol, ref, rq, n)
    assert loss.item() == pytest.approx((0.0727605 + 0.2026921) / 2, abs=1e-6)
    assert loss.item() == pytest.approx((by_hand(0.8, -12, -15, 10) + by_hand(0.3, -40, -38, 100)) / 2, rel=1e-6)
    # no clamp: β/|y| = 0.5 takes the exact branch β log β + β log(e^{1/β} − 1) = 0.5807197
    exact = qrpo_loss(torch.tensor([-3.0]), torch.tensor([-3.5]), torch.tensor([1.0]), torch.tensor([10.0]),
                      max_beta=None)
    assert exact.item() == pytest.approx((1 - 0.5807197 - 0.25) ** 2, abs=1e-6)
    assert exact.item() == pytest.approx(by_hand(1.0, -3, -3.5, 10, max_beta=None), rel=1e-6)
    # the two branches meet at 0.2 (the approximation drops β log(1 − e^{−1/β}) ≈ −0.0013)
    b = torch.tensor([0.2 - 1e-6, 0.2 + 1e-6], dtype=torch.float64)
    assert abs(beta_log_z(b)[0] - beta_log_z(b)[1]).item() < 2e-3
    # a batch mixing all cases is the mean of the hand values; β = 2, clamp 0.3
    cases = [(0.0, -5.0, -4.0, 4), (0.5, -20.0, -20.0, 25), (0.9, -1.0, -2.0, 3), (1.0, -60.0, -61.5, 80)]
    t = [torch.tensor([c[i] for c in cases], dtype=torch.float64) for i in range(4)]
    want = sum(by_hand(*c, beta=2.0, max_beta=0.3) for c in cases) / len(cases)
    assert qrpo_loss(t[1], t[2], t[0], t[3], beta=2.0, max_beta=0.3).item() == pytest.approx(want, rel=1e-9)


def test_dpo_length_normalised_equals_hand_computation():
    got = dpo_losses(torch.tensor([-10.0]), torch.tensor([-30.0]), torch.tensor([-11.0]), torch.tensor([-28.0]),
                     torch.tensor([20.0]), torch.tensor([40.0]), beta=5.0)
    z = 5 / 20 * 1.0 - 5 / 40 * (-2.0)  # 0.25 + 0.25
    assert got.item() == pytest.approx(-math.log(1 / (1 + math.exp(-z))), rel=1e-6)


def small_model():
    from apertus.config import model_config_from
    from apertus.model import build_model

    cfg = model_config_from({**ph.SMALL, "vocab_size": 512})
    return build_model(cfg, seed=0)


def test_gradients_push_high_quantile_completions_up_and_low_quantile_ones_down():
    model = small_model()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, 512, (12,), generator=g).tolist()
    a = {"ids": torch.randint(4, 512, (9,), generator=g).tolist(), "quantile": 1.0}
    b = {"ids": torch.randint(4, 512, (9,), generator=g).tolist(), "quantile": 0.0}
    batch = pair_batch([(prompt, a, b)])
    with torch.no_grad():
        ref = sequence_logps(model, batch)
    assert torch.equal(batch["loss_mask"].sum(1), torch.tensor([9, 9]))  # the completion tokens, not the prompt
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        loss = qrpo_losses(sequence_logps(model, batch), ref, batch["quantiles"], batch["lengths"]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = sequence_logps(model, batch)
    assert after[0] > ref[0] + 0.1 and after[1] < ref[1] - 0.1
    # the gradient of the loss w.r.t. each log-prob has the sign docs/recipe.md §6.2 implies: −2β(R_q − β log Z − β·Δ)
    logps = ref.clone().requires_grad_(True)
    qrpo_losses(logps, ref, torch.tensor([1.0, 0.0]), torch.tensor([9.0, 9.0])).sum().backward()
    assert logps.grad[0] < 0 < logps.grad[1]


def test_quantile_rewards_and_pair_choice():
    rec = {"ref_rewards": [0.0, 0.5, 0.5, 1.0]}
    pool = [{"text": "a", "reward": 0.5}, {"text": "b", "reward": 1.0}, {"text": "c", "reward": 0.0},
            {"text": " ", "reward": 2.0}, {"text": "d", "reward": 0.7}]
    assert choose_pair(rec, pool) is None
    assert [c["quantile"] for c in pool] == [0.75, 1.0, 0.25, 1.0, 0.75]  # share of reference rewards <= reward
    assert rec["chosen"]["text"] == "b" and rec["rejected"]["text"] == "c"  # the empty reply is never trained on
    assert choose_pair({"ref_rewards": [1.0, 1.0]}, [{"text": "a", "reward": 1.0}, {"text": "b", "reward": 1.0}]) \
        == "no_signal"
    assert choose_pair({"ref_rewards": [1.0]}, [{"text": "", "reward": 1.0}]) == "empty_completion"


def test_percentile_matches_numpy():
    import numpy as np

    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 10, 11):
        xs = rng.normal(size=n).round(2).tolist()
        for q in (0.0, 0.2, 0.37, 0.5, 1.0):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, 100 * q)), abs=1e-12)


def test_apertus_pairs_chosen_beats_every_reference_sample_rejected_below_the_20th_percentile():
    ref = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # 20th percentile (linear): 0.28
    samples = [{"text": f"s{i}", "reward": r, "finish_reason": "stop", "source": "ref"} for i, r in enumerate(ref)]
    offline = [{"text": "cut", "reward": 3.0, "finish_reason": "length", "source": "file"},  # best, but cut off
               {"text": "good", "reward": 2.0, "finish_reason": "stop", "source": "file"},
               {"text": "fine", "reward": 1.5, "finish_reason": "stop", "source": "column"},
               {"text": "tie", "reward": 1.0, "finish_reason": "stop", "source": "dataset"},  # ties the best sample
               {"text": "bad", "reward": 0.25, "finish_reason": "stop", "source": "file"}]
    rule = Pairs(rule="apertus")
    rec = {"ref_rewards": ref}
    assert choose_pair(rec, samples + offline, rule) is None
    assert rec["chosen"]["text"] == "good" and rec["chosen"]["quantile"] == 1.0
    assert rec["rejected"]["text"] == "s0" and rec["rejected"]["quantile"] == 0.1
    # only completions strictly below 0.28 can be rejected: without s0 and s1 it is the off-policy "bad"
    rec = {"ref_rewards": ref}
    assert choose_pair(rec, samples[2:] + offline, rule) is None and rec["rejected"]["text"] == "bad"
    # the on-policy rule keeps its choice: the best of the pool even when cut off, the worst
    rec = {"ref_rewards": ref}
    assert choose_pair(rec, samples + offline) is None and (rec["chosen"]["text"], rec["rejected"]["text"]) == (
        "cut", "s0")
    # nothing above every reference sample (a tie is not a win; a cut-off reply never counts): no pair
    assert choose_pair({"ref_rewards": ref}, samples + [offline[0], offline[3]], rule) == "no_chosen"
    # all reference rewards equal: nothing lies below their 20th percentile
    same = [{"text": "x", "reward": 0.5, "finish_reason": "stop"} for _ in range(4)]
    assert choose_pair({"ref_rewards": [0.5] * 4}, same + [offline[1]], rule) == "no_rejected"
    assert choose_pair({"ref_rewards": [0.5] * 4}, same + [offline[1]], Pairs(rule="apertus",
                                                                               rejected_quantile=0.9)) == "no_rejected"
    assert choose_pair({"ref_rewards": ref}, samples + [{**offline[1], "text": "  "}], rule) == "no_chosen"


def test_candidate_pool_from_a_file_and_a_column(tmp_path, tmp_path_factory):
    from apertus.train.qrpo import load_prompts

    f = tmp_path / "cands.jsonl"
    f.write_text(json.dumps({"index": 1, "completions": ["#### 5", {"text": "long", "finish_reason": "length"}]})
                 + "\n\n" + json.dumps({"index": 1, "completions": ["#### 6"]}) + "\n")
    pool = read_candidate_file(f)
    assert [(c["text"], c["finish_reason"]) for c in pool[1]] == [("#### 5", "stop"), ("long", "length"),
                                                                   ("#### 6", "stop")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"index": 0}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_candidate_file(bad)
    tok = ph.gsm8k_tokenizer(ph.tokenizer_dir(tmp_path_factory))
    rows = [{"messages": [{"role": "user", "content": "2+2?"}], "meta": {"gpt": "#### 4"}},
            {"messages": [{"role": "user", "content": "2+3?"}], "meta": {"gpt": ["#### 5", "five"]}}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = load_prompts(tok, [{"format": "chat", "path": str(path)}], max_tokens=16, seq_len=256, date=ph.DATE,
                       with_candidates=False, column="gpt", file_pool=pool)
    assert [[(c["text"], c["source"]) for c in p] for _, p in out] == [
        [("#### 4", "column")], [("#### 5", "column"), ("five", "column"), ("#### 5", "file"), ("long", "file"),
                                 ("#### 6", "file")]]
    table = {"model": {"preset": "tiny"}, "data": {"prompts": [{"format": "chat", "path": str(path)}]}}
    assert _parse_pairs(table, {"rule": "apertus"}).pairs == Pairs("apertus", 0.2)
    with pytest.raises(ValueError, match=r"\[pairs\] rule"):
        _parse_pairs(table, {"rule": "best"})
    with pytest.raises(ValueError, match="candidates_file"):
        _parse_pairs({**table, "data": {**table["data"], "candidates_file": str(tmp_path / "missing.jsonl")}}, {})


def _parse_pairs(table: dict, pairs: dict):
    """parse_align_recipe of a table whose [model] is a saved tiny checkpoint (alignment needs init_from)."""
    import tempfile

    from apertus.checkpoint import save_model
    from apertus.config import model_config_from
    from apertus.model import build_model
    from apertus.train.qrpo import parse_align_recipe

    with tempfile.TemporaryDirectory() as tmp:
        save_model(build_model(model_config_from(dict(ph.SMALL)), seed=0), tmp)
        return parse_align_recipe({**table, "model": {"init_from": tmp}, "pairs": pairs})


def test_alignment_prompts_skip_bad_input(tmp_path, tmp_path_factory):
    from apertus.train.qrpo import load_prompts

    tok = ph.gsm8k_tokenizer(ph.tokenizer_dir(tmp_path_factory))
    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "#### 4"}]},
            {"messages": [{"role": "assistant", "content": "Hello"}]},  # no prompt left
            {"messages": [{"role": "user", "content": "many words " * 300}]},  # longer than the context
            {"messages": [{"role": "wizard", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "hi"}], "meta": {"candidates": ["Hi!", "Go away."]}}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    out = load_prompts(tok, [{"format": "chat", "path": str(path)}], max_tokens=64, seq_len=256, date=ph.DATE,
                       with_candidates=True)
    assert [rec.get("skipped") for rec, _ in out] == [None, "invalid", "too_long", "invalid", None, "invalid"]
    texts = [[c["text"] for c in pool] for _, pool in out]
    assert texts[0] == ["#### 4"] and texts[4] == ["Hi!", "Go away."]  # offline candidates join the pool
    assert tok.decode(out[0][0]["prompt_ids"][-1:]) == "<|assistant_start|>"


# --- rewards ----------------------------------------------------------------------------------------------------------


def test_gsm8k_closeness_grades_the_final_number_by_the_same_rule_as_gsm8k_correct():
    meta = {"answer": "1,200"}
    cases = [("so 1,200 in all", 1.0), ("#### 1200\n", 1.0), ("12 then 600", 0.5), ("900 or\n#### 1500", 0.75),
             ("no number", 0.0), ("<SPECIAL_12> 300", 0.25), ("-1200", 0.0)]
    for text, want in cases:
        assert gsm8k_closeness([], text, meta) == pytest.approx(want), text
        assert gsm8k_correct([], text, meta) == float(want == 1.0), text
    assert gsm8k_closeness([], "7", {}) == 0.0  # no reference answer
    assert load_function("gsm8k_closeness") is gsm8k_closeness


def test_rule_rewards_and_python_functions(tmp_path):
    meta = {"answer": "1,200", "finish_reason": "stop"}
    assert gsm8k_correct([], "She has 3 + 4 = 7.\n#### 1200", meta) == 1.0
    assert gsm8k_correct([], "so the answer is 1200.0", meta) == 1.0  # no #### line: the last number
    assert gsm8k_correct([], "#### 1201", meta) == 0.0
    assert gsm8k_format([], "3 + 4 = 7\n#### 7", meta) == 1.0
    assert gsm8k_format([], "3 + 4 = 7\n#### 7", {"finish_reason": "length"}) == 0.0  # cut off: not the format
    assert gsm8k_format([], "#### 7 and more", meta) == 0.0
    f = tmp_path / "my_reward.py"
    f.write_text("def short(messages, completion, meta):\n    return -len(completion)\n")
    score = function_reward({"gsm8k_correct": 1.0, f"{f}:short": 0.01})
    items = [{"messages": [], "completion": c, "meta": meta} for c in ("#### 1200", "12")]
    assert score(items) == pytest.approx([1 - 0.09, -0.02])
    with pytest.raises(ValueError, match="built-in"):
        load_function("nonsense")


def test_reward_model_from_a_local_transformers_sequence_classifier(tmp_path, tmp_path_factory):
    import transformers

    from apertus.train.rewards import model_reward

    tok = ph.gsm8k_tokenizer(ph.tokenizer_dir(tmp_path_factory))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.inner, eos_token="</s>", pad_token="<pad>")
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=3)
    torch.manual_seed(0)
    rm = transformers.LlamaForSequenceClassification(cfg).eval()
    rm.save_pretrained(tmp_path / "rm")
    fast.save_pretrained(tmp_path / "rm")
    score = model_reward(str(tmp_path / "rm"), batch_size=3)
    items = [{"messages": [{"role": "user", "content": q}], "completion": c, "meta": {}}
             for q, c in (("How many?", "Four."), ("What is 2 + 2? Think step by step.", "2 + 2 = 4\n#### 4"),
                          ("Hi", "Hello, how can I help you today?"), ("x", "y"))]
    got = score(items)
    for item, s in zip(items, got, strict=True):  # one at a time, no padding: the classifier's own score
        conv = item["messages"] + [{"role": "assistant", "content": item["completion"]}]
        text = "".join(f"{m['role']}: {m['content']}\n" for m in conv)
        ids = torch.tensor([fast(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            assert s == pytest.approx(rm(ids).logits[0, 0].item(), abs=1e-5)
    assert len(set(got)) == 4


def test_judge_digit_score():
    ids = {101: 1, 105: 5, 109: 9}
    assert digit_score([(105, 0.0)], ids) == 5.0
    assert digit_score([(101, math.log(0.25)), (7, math.log(0.5)), (109, math.log(0.25))], ids) == pytest.approx(5.0)
    assert digit_score([(101, math.log(0.6)), (109, math.log(0.2))], ids) == pytest.approx((0.6 + 9 * 0.2) / 0.8)
    assert digit_score([(7, 0.0)], ids) is None



# --- the engine-based pieces: a judge, resumable rollouts, alignment end to end --------------------------------------


def instruct_checkpoint(model, tok, out):
    from apertus.checkpoint import save_model
    from apertus.train.posttrain import instruct_tokenizer_files

    save_model(model, out, instruct=True, extra_files=instruct_tokenizer_files(tok))
    return out


def test_llm_judge_scores_the_digit_distribution_of_its_first_token(tmp_path, tmp_path_factory):
    from apertus.chat import encode_chat
    from apertus.config import model_config_from
    from apertus.model import build_model
    from apertus.train.rewards import CHARTER_RUBRIC, judge_prompt, judge_reward

    tok = ph.gsm8k_tokenizer(ph.tokenizer_dir(tmp_path_factory))
    model = build_model(model_config_from(dict(ph.SMALL)), seed=1).eval()
    digits = {tok.encode(str(d), bos=False)[0]: d for d in range(1, 10)}
    with torch.no_grad():  # only the digits get logits: some of them are among the top 20, the rest of the vocab ties
        keep = model.lm_head.weight[list(digits)].clone() * 50
        model.lm_head.weight.zero_()
        model.lm_head.weight[list(digits)] = keep
    path = instruct_checkpoint(model, tok, tmp_path / "judge")
    score = judge_reward(str(path), date=ph.DATE, device="cpu")
    items = [{"messages": [{"role": "user", "content": "Is it safe to eat raw chicken?"}], "completion": c, "meta": {}}
             for c in ("No: cook it to 74 C first.", "Yes, always.")]
    try:
        got = score(items)
    finally:
        score.close()
    for item, s in zip(items, got, strict=True):
        ids = encode_chat(tok, judge_prompt(item, CHARTER_RUBRIC), add_generation_prompt=True, date=ph.DATE)[0]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), -1)
        top = lp.topk(20)
        want = digit_score(list(zip(top.indices.tolist(), top.values.tolist(), strict=True)), digits)
        assert want is not None and 1 <= s <= 9 and s == pytest.approx(want, abs=1e-4)
    assert score.unparsed["n"] == 0


def align_recipe(init_from, **over) -> dict:
    r = {"model": {"init_from": str(init_from)},
         "data": {"prompts": [ph.gsm8k("train", 48, skip=400)], "eval_prompts": [ph.gsm8k("test", 48)],
                  "date": ph.DATE},
         "sampling": {"n": 6, "temperature": 0.7, "max_tokens": 96, "chunk": 16, "eval_n": 2},
         "reward": {"kind": "function", "functions": {"gsm8k_format": 1.0, "ends_turn": 0.5}},
         "loss": {"name": "qrpo"},
         "train": {"seq_len": 384, "batch_size": 8, "micro_batch": 8, "epochs": 4, "dtype": "fp32", "log_every": 4},
         "optim": {"lr": 3e-4, "betas": [0.9, 0.999, 0.99], "warmup_ratio": 0.1},
         "export": {"dtype": "fp32"}}
    for section, values in over.items():
        r[section] = r.get(section, {}) | values
    return r


def test_rollouts_are_written_per_chunk_and_resume_after_a_kill(tmp_path, tmp_path_factory):
    from apertus.config import model_config_from
    from apertus.model import build_model
    from apertus.train.distributed import Dist
    from apertus.train.qrpo import parse_align_recipe, rollouts

    tok = ph.gsm8k_tokenizer(ph.tokenizer_dir(tmp_path_factory))
    path = instruct_checkpoint(build_model(model_config_from(dict(ph.SMALL)), seed=0), tok, tmp_path / "m")
    (tmp_path / "length.py").write_text("def length(messages, completion, meta):\n    return len(completion)\n")
    recipe = parse_align_recipe(align_recipe(path, data={"prompts": [ph.gsm8k("train", 5)]},
                                             sampling={"n": 3, "chunk": 2, "max_tokens": 12},
                                             reward={"functions": {f"{tmp_path / 'length.py'}:length": 1.0}}))
    folder = tmp_path / "rollouts"
    first = rollouts(recipe, tok, folder, Dist(), ph.DATE)
    assert sorted(first) == [0, 1, 2, 3, 4]
    rec = first[3]
    assert len(rec["samples"]) == 3 and rec["ref_rewards"] == [len(s["text"]) for s in rec["samples"]]
    for c in (rec["chosen"], rec["rejected"]):  # the artifacts: reward, quantile, reference log-prob per completion
        assert c["quantile"] == sum(r <= c["reward"] for r in rec["ref_rewards"]) / 3 and c["ref_logp"] < 0
    # a kill while the last chunk was being written: its line is cut short; the rerun samples only that prompt
    file = folder / "rank00000.jsonl"
    lines = file.read_text().splitlines(keepends=True)
    file.write_text("".join(lines[:4]) + lines[4][:50])
    again = rollouts(recipe, tok, folder, Dist(), ph.DATE)
    assert again == first  # the same seeds give the same samples, rewards and log-probs
    assert len(file.read_text().splitlines()) == 5


@pytest.mark.slow
def test_align_end_to_end_raises_the_held_out_reward_over_the_sft_model(tmp_path, tmp_path_factory, capsys):
    from apertus import cli
    from apertus.train.qrpo import run

    sft = ph.trained_sft(tmp_path_factory)
    recipe = ph.write_recipe(align_recipe(sft / "hf"), tmp_path / "align.toml")
    assert cli.main(["align", str(recipe), "--out", str(tmp_path / "qrpo")]) == 0
    qrpo = json.loads((tmp_path / "qrpo" / "eval" / "summary.json").read_text())
    # the DPO baseline on the same rollouts, through the Python entry point
    hf = run(recipe, tmp_path / "dpo", init_from=sft / "hf",
             overrides=['loss.name="dpo"', f"data.rollouts={tmp_path / 'qrpo' / 'rollouts'}"])
    assert hf == tmp_path / "dpo" / "hf"
    dpo = json.loads((tmp_path / "dpo" / "eval" / "summary.json").read_text())
    ref, after = qrpo["reference"]["mean_reward"], qrpo["policy"]["mean_reward"]
    with capsys.disabled():
        print(f"\nheld-out mean reward: SFT {ref:.3f}, QRPO {after:.3f}, DPO {dpo['policy']['mean_reward']:.3f}")
    assert dpo["reference"] == qrpo["reference"]  # the same SFT samples (fixed seeds)
    assert after > ref + 0.02
    stats = json.loads((tmp_path / "qrpo" / "align_data.json").read_text())
    assert stats["pairs"] > 0 and stats["chosen_quantile"] > stats["rejected_quantile"]
    run = json.loads((tmp_path / "qrpo" / "run.json").read_text())
    assert run["kind"] == "align" and any(k.startswith("rollouts/") for k in run["artifacts"])
    generation = json.loads((tmp_path / "qrpo" / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 68, 72]
