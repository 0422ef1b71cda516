"""The sampler against transformers' logits processors (the reference we did not write) and against its own
distribution (empirical frequencies of many seeded draws)."""

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from apertus.infer.sampler import (
    SamplingParams,
    apply_penalties,
    defaults_from_generation_config,
    filtered_probs,
    sample,
)
from apertus.infer.structured import MASKED


def hf_probs(logits, temperature, top_k, top_p, min_p):
    procs = [TemperatureLogitsWarper(temperature)]
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        procs.append(TopPLogitsWarper(top_p))
    if min_p:
        procs.append(MinPLogitsWarper(min_p))
    return torch.softmax(LogitsProcessorList(procs)(None, logits.clone()), dim=-1)


CASES = [  # (temperature, top_k, top_p, min_p)
    (1.0, 0, 1.0, 0.0), (0.8, 0, 0.9, 0.0), (0.7, 40, 1.0, 0.0), (1.3, 50, 0.8, 0.0), (1.0, 0, 1.0, 0.1),
    (0.8, 20, 0.95, 0.05), (2.0, 0, 0.5, 0.0), (0.5, 1, 1.0, 0.0), (1.0, 300, 0.99, 0.0),
]


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])  # flat (nucleus beyond the 256 candidates) to peaked
def test_filtered_distribution_matches_transformers(scale):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(CASES), 1000, generator=g) * scale
    cols = list(zip(*CASES, strict=True))
    ours = filtered_probs(logits, torch.tensor(cols[0]), torch.tensor(cols[1]), torch.tensor(cols[2]),
                          torch.tensor(cols[3]))
    for b, case in enumerate(CASES):
        ref = hf_probs(logits[b:b + 1], *case)[0]
        torch.testing.assert_close(ours[b], ref, atol=1e-6, rtol=1e-5, msg=f"case {case}")
        assert int((ours[b] > 0).sum()) == int((ref > 0).sum()), case


def test_repetition_penalty_matches_transformers_and_openai_penalties():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 50, generator=g) * 3
    prompt, output = [3, 7, 7, 10], [10, 11, 11, 11]
    seen = torch.zeros(50, dtype=torch.bool)
    seen[prompt] = True
    counts = torch.zeros(50)
    for t in output:
        counts[t] += 1
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)]
    ours = apply_penalties(logits.clone(), params, [seen, seen], [counts, counts])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits[:1].clone())
    torch.testing.assert_close(ours[:1], ref)
    expected = logits[1] - (counts > 0).float() * 0.5 - counts * 0.25  # OpenAI's documented formula
    torch.testing.assert_close(ours[1], expected)
    assert torch.equal(ours[1, prompt[:2]], logits[1, prompt[:2]])  # presence/frequency ignore the prompt


def test_draws_follow_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0]).repeat(20000, 1)
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=6)] * 20000
    gens = [torch.Generator().manual_seed(i) for i in range(20000)]
    tokens, *_ = sample(logits, params, gens)
    freq = torch.bincount(tokens, minlength=8).float() / 20000
    expected = hf_probs(logits[:1], 0.9, 6, 0.9, 0.0)[0]
    assert (freq - expected).abs().max() < 0.015, (freq, expected)
    assert freq[expected == 0].sum() == 0


def test_seeded_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 300, generator=g)
    p = SamplingParams(temperature=1.0, top_p=0.95)
    alone = [sample(logits[b:b + 1], [p], [torch.Generator().manual_seed(b)])[0].item() for b in range(6)]
    together, *_ = sample(logits, [p] * 6, [torch.Generator().manual_seed(b) for b in range(6)])
    assert together.tolist() == alone


def test_greedy_logprobs_are_the_models():
    logits = torch.randn(3, 40)
    p = SamplingParams(temperature=0, logprobs=True, top_logprobs=5, repetition_penalty=1.0)
    tokens, lp, top_ids, top_lp = sample(logits, [p] * 3, [torch.Generator()] * 3)
    ref = torch.log_softmax(logits, -1)
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(lp, ref.gather(1, tokens[:, None]).squeeze(1))
    torch.testing.assert_close(top_lp, ref.topk(5).values)
    assert torch.equal(top_ids[:, 0], tokens)


def test_parameters_are_checked_and_defaults_come_from_generation_config():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=1.5), dict(max_tokens=0),
                dict(top_logprobs=50), dict(stop=[""]), dict(repetition_penalty=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    d = defaults_from_generation_config({"eos_token_id": [2, 68, 72], "temperature": 0.6}, 2)
    assert d["stop_token_ids"] == [2, 68, 72] and d["temperature"] == 0.6 and d["top_p"] == 0.9
    assert defaults_from_generation_config({"do_sample": False}, 2)["temperature"] == 0
    d = defaults_from_generation_config({}, 2)
    assert (d["temperature"], d["top_p"], d["stop_token_ids"]) == (0.8, 0.9, [2])
    p = SamplingParams(top_p=0.5).resolved(d)
    assert (p.temperature, p.top_p, p.stop_token_ids) == (0.8, 0.5, [2])


def test_logit_bias_plus_100_forces_and_minus_100_bans_greedy_and_sampled():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(400, 300, generator=g) * 3
    top = logits.argmax(-1)
    for temperature in (0.0, 1.0):
        gens = [torch.Generator().manual_seed(i) for i in range(400)]
        forced = [SamplingParams(temperature=temperature, logit_bias={7: 100})] * 400
        tokens, *_ = sample(logits, forced, gens)
        assert tokens.tolist() == [7] * 400
        # each row bans its own most likely token; unbiased draws take it often, biased ones never
        banned = [SamplingParams(temperature=temperature, logit_bias={int(top[b]): -100}) for b in range(400)]
        plain = [SamplingParams(temperature=temperature)] * 400
        tokens, *_ = sample(logits, banned, [torch.Generator().manual_seed(i) for i in range(400)])
        free, *_ = sample(logits, plain, [torch.Generator().manual_seed(i) for i in range(400)])
        assert not (tokens == top).any() and (free == top).sum() > 100
    # the bias is added to the logits before temperature and top-p (OpenAI's semantics), e.g. +1 on token 0
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    p = SamplingParams(temperature=0.5, top_p=0.9, logit_bias={0: 1.0})
    probs = filtered_probs(logits + torch.tensor([[1.0, 0, 0]]), torch.tensor([0.5]), torch.tensor([0]),
                           torch.tensor([0.9]), torch.tensor([0.0]))[0]
    draws, *_ = sample(logits.repeat(4000, 1), [p] * 4000, [torch.Generator().manual_seed(i) for i in range(4000)])
    freq = torch.bincount(draws, minlength=3).float() / 4000
    assert (freq - probs).abs().max() < 0.03 and freq[0] > 0.05, (freq, probs)


def test_grammar_masks_restrict_rows_and_leave_the_others_alone():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 50, generator=g)
    masks = [torch.full((50,), MASKED), None, None]
    masks[0][[5, 9]] = 0
    params = [SamplingParams(temperature=1.0, json_schema={"type": "object"}), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0)]
    alone = [sample(logits[b:b + 1], [params[b]], [torch.Generator().manual_seed(b)])[0].item() for b in (1, 2)]
    for seed in range(20):
        gens = [torch.Generator().manual_seed(seed)] + [torch.Generator().manual_seed(b) for b in (1, 2)]
        tokens, lp, *_ = sample(logits, params, gens, masks=masks)
        assert tokens[0].item() in (5, 9) and tokens[1:].tolist() == alone


def test_logit_bias_and_grammar_fields_are_checked():
    for bad in ({-1: 5.0}, {3: 101}, {3: -100.5}, {"3": 1.0}, {True: 1.0}):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)
    with pytest.raises(ValueError, match="grammar"):
        SamplingParams(json_schema={"type": "object"}, grammar='start: "a"')
    assert SamplingParams(grammar='start: "a"').constrained and not SamplingParams().constrained
