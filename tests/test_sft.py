"""SFT: converters, the loss mask on rendered conversations (ids against transformers' official template, masked
labels decoded), packing with per-conversation attention, bad input skipped and counted, a tiny model that learns to
answer in the chat format and stop, the instruct export, and FSDP2 over two processes with resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import posttrain_helpers as ph
import pytest
import torch
from safetensors.torch import load_file

from apertus import cli
from apertus.train.chat_data import encode, read_source
from apertus.train.sft import collate, pack, parse_sft_recipe, run

DATE = ph.DATE
WEATHER = {"name": "get_weather", "description": "Get weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "City name"}}, "required": ["city"]}}
SYS = {"role": "system", "content": "You are a test."}
CONVERSATIONS = [
    {"messages": [SYS, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    {"messages": [SYS, {"role": "user", "content": "Weather in Bern?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Bern"}}}]},
                  {"role": "tool", "content": '{"temp": 20}'}, {"role": "assistant", "content": "It is 20 C."}],
     "tools": [WEATHER]},
    {"messages": [SYS, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back politely."}]},
]
# what the assistant wrote in each: the only text that may carry loss
ASSISTANT_TEXT = ["Hello!<|assistant_end|>4<|assistant_end|>",
                  '<|tools_prefix|>[{"get_weather": {"city": "Bern"}}]<|tools_suffix|>It is 20 C.<|assistant_end|>',
                  "<|inner_prefix|>Greet back politely.<|inner_suffix|>Hello!<|assistant_end|>"]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_converters(tmp_path):
    [g] = read_source(ph.gsm8k("train", 1))
    assert g["messages"][0] == {"role": "system", "content": ph.SYSTEM}
    assert "<<" not in g["messages"][2]["content"] and g["messages"][2]["content"].endswith("#### 72")
    assert g["meta"]["answer"] == "72"
    [dolly] = read_source({"format": "dolly", "path": "dolly_open_qa/chinkara-open_qa.jsonl", "limit": 1})
    assert dolly["messages"][0] == {"role": "user", "content": "Why can camels survive for long without water?"}
    assert dolly["messages"][1]["content"].startswith("Camels use the fat")
    [orca] = read_source({"format": "orca", "path": "orca_dpo_pairs/validation.jsonl", "limit": 1})
    assert [m["role"] for m in orca["messages"]] == ["system", "user", "assistant"]
    assert orca["messages"][2]["content"].startswith("Step 1:") and orca["meta"]["rejected"].startswith("Sure")
    [chat] = read_source({"format": "chat", "path": str(write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS[2:]))})
    assert chat["enable_thinking"] and chat["messages"][2]["content"] == {"blocks": [
        {"type": "thoughts", "text": "Greet back politely."}, {"type": "response", "text": "Hello!"}]}


def test_loss_mask_covers_exactly_the_assistant_tokens_of_rendered_conversations(tmp_path, data_dir,
                                                                                  apertus_tokenizer_json):
    import transformers

    from apertus.chat import normalize_messages
    from apertus.config import model_config_from
    from apertus.model import build_model, document_mask
    from apertus.tokenizer import Tokenizer

    tok = Tokenizer.from_file(apertus_tokenizer_json)
    hf = transformers.AutoTokenizer.from_pretrained(str(apertus_tokenizer_json.parent))
    convs = list(read_source({"format": "chat", "path": str(write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS))}))
    examples = [encode(tok, c, 4096, DATE, format="release") for c in convs]  # ids of the released template
    for conv, (ids, _) in zip(convs, examples, strict=True):  # the ids are the official template's
        # (the template reads OpenAI's content None as an error: normalize_messages fills "", as test_chat checks)
        want = hf.apply_chat_template(normalize_messages(conv["messages"]), tools=conv["tools"],
                                      enable_thinking=conv["enable_thinking"], tokenize=True, return_dict=False)
        assert ids == list(want)
    [row] = pack([len(x) for x, _ in examples], 4096, packing=True, seed=0)
    assert sorted(row) == [0, 1, 2]
    b = collate(examples, [row])
    labels, mask, pos = b["labels"][0], b["loss_mask"][0], b["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert len(starts) == 3  # positions restart with every conversation
    bounds = starts + [len(pos)]
    for k in range(3):
        seg = slice(bounds[k], bounds[k + 1])
        conv_ids = examples[row[k]][0]
        assert b["input_ids"][0, seg].tolist() == conv_ids[:-1] and labels[seg].tolist() == conv_ids[1:]
        assert tok.decode(labels[seg][mask[seg]].tolist()) == ASSISTANT_TEXT[row[k]]
        # everything else (system, user, tool output, <|assistant_start|>) is outside the loss
        assert "Weather in Bern" in tok.decode(labels[seg][~mask[seg]].tolist()) or row[k] != 1
    # attention stays inside each conversation: the packed row gives each conversation's own logits
    cfg = model_config_from({"preset": "tiny", "vocab_size": 131072, "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1})
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        packed = model(b["input_ids"], position_ids=b["position_ids"], attn_mask=document_mask(b["position_ids"]))
        for k in range(3):
            alone = model(torch.tensor([examples[row[k]][0][:-1]]))
            assert torch.allclose(packed[0, bounds[k]:bounds[k + 1]], alone[0], atol=1e-4)


def test_padding_mode_and_packing_fill():
    examples = [([1] + [5] * n, [False] + [True] * n) for n in (3, 5, 2, 9)]
    assert pack([len(x) for x, _ in examples], 16, packing=False, seed=0) and all(
        len(r) == 1 for r in pack([4, 6, 3, 10], 16, packing=False, seed=0))
    rows = pack([len(x) for x, _ in examples], 10, packing=True, seed=1)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3]
    assert all(sum(len(examples[i][0]) - 1 for i in r) <= 10 for r in rows)
    b = collate(examples, [[3], [0]])  # padded to the longest row; padding carries no loss
    assert b["input_ids"].shape == (2, 9) and b["loss_mask"][1].sum() == 3 and not b["loss_mask"][1, 3:].any()
    assert b["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5]  # padding is its own "conversation"


def run_sft(recipe: dict, out: Path, tmp: Path, nproc: int = 1, capture=True) -> subprocess.CompletedProcess:
    """`apertus sft` on a recipe dict, in a subprocess (torchrun for nproc > 1)."""
    path = ph.write_recipe(recipe, tmp / f"recipe-{out.name}.toml")
    cmd = [sys.executable, "-m", "apertus.cli", "sft", str(path), "--out", str(out), "--nproc", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=capture, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout or "")[-3000:] + (done.stderr or "")[-3000:]
    return done


def test_bad_conversations_are_skipped_and_counted(tmp_path, tmp_path_factory, capsys):
    tok_dir = ph.tokenizer_dir(tmp_path_factory)
    good = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "#### 4"}]}
    bad = [
        "not json",  # invalid
        {"messages": [{"role": "user", "content": "hi"}], "x": 1},  # no final assistant turn
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},  # empty
        {"messages": [{"role": "user", "content": "hi " * 400}, {"role": "assistant", "content": "ok"}]},  # too long
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "ok"}]},  # invalid role
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                      {"role": "user", "content": "and?"}]},  # ends with the user
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", [good] * 7 + bad)
    recipe = ph.sft_recipe(tok_dir, steps=1, seq_len=256)
    recipe["data"]["sources"] = [{"format": "chat", "path": str(data), "system": ph.SYSTEM}]
    path = ph.write_recipe(recipe, tmp_path / "r.toml")
    assert cli.main(["sft", str(path), "--out", str(tmp_path / "run")]) == 0
    stats = json.loads((tmp_path / "run" / "sft_data.json").read_text())
    assert stats["conversations"] == 7
    assert stats["skipped"] == {"invalid": 2, "no_final_assistant_turn": 2, "empty_completion": 1, "too_long": 1}
    assert "skipped invalid 2, no_final_assistant_turn 2, empty_completion 1, too_long 1" in capsys.readouterr().out
    recipe["data"]["sources"] = [{"format": "chat", "path": str(write_jsonl(tmp_path / "b.jsonl", bad))}]
    ph.write_recipe(recipe, path)
    assert cli.main(["sft", str(path), "--out", str(tmp_path / "run2")]) == 2  # nothing left: a clear error
    assert "no conversation left to train on" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch_size 6 is not divisible"):
        parse_sft_recipe(recipe | {"train": dict(recipe["train"], batch_size=6)}, world_size=1)


@pytest.mark.slow
def test_tiny_model_after_sft_answers_in_the_chat_format_and_stops(tmp_path_factory):
    import transformers

    from apertus.chat import encode_chat, parse_reply, render
    from apertus.infer import Engine, SamplingParams
    from apertus.tokenizer import Tokenizer

    run = ph.trained_sft(tmp_path_factory)  # 400 GSM8K conversations, 2 epochs
    tok = Tokenizer.from_file(run / "hf")
    hf = run / "hf"
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == [2, 68, 72]
    config = json.loads((hf / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|assistant_end|>" and "<|assistant_start|>" in config["chat_template"]
    questions = [c["messages"][:2] for c in read_source(ph.gsm8k("test", 8))]
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)  # the exported template renders our format
    assert hf_tok.apply_chat_template(questions[0], add_generation_prompt=True, tokenize=False) == render(
        questions[0], add_generation_prompt=True)
    prompts = [encode_chat(tok, q, add_generation_prompt=True)[0] for q in questions]
    with Engine(hf) as engine:  # sampled (seeded): greedy decoding of a model this small loops on digits
        results = engine.generate(prompts, [SamplingParams(temperature=0.7, max_tokens=200, seed=i) for i in range(8)])
        greedy = engine.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=24))[0]
    stopped = [r for r in results if r.finish_reason == "stop" and r.output_ids[-1] == 68]
    assert len(stopped) >= 6, [r.text for r in results]
    for r in stopped:  # GSM8K's format: reasoning lines, then "#### <number>", then <|assistant_end|>
        content = parse_reply(r.output_ids, tok)["content"]
        assert content == r.text and 68 not in r.output_ids[:-1]
    assert sum("#### " in r.text for r in stopped) >= len(stopped) // 2
    # transformers loads the export (its generation config stops on 2, 68, 72) and decodes the same tokens
    model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    assert model.generation_config.eos_token_id == [2, 68, 72]
    ids = torch.tensor([prompts[0]])
    out = model.generate(ids, do_sample=False, max_new_tokens=24)[0, ids.shape[1]:].tolist()
    assert out == greedy.output_ids


@pytest.mark.slow
def test_fsdp_two_processes_matches_one_process_and_resumes(tmp_path, tmp_path_factory):
    tok_dir = ph.tokenizer_dir(tmp_path_factory)
    recipe = ph.sft_recipe(tok_dir, steps=4, micro_batch=2)
    recipe["data"]["sources"] = [ph.gsm8k("train", 64)]
    recipe["checkpoint"] = {"every": 2, "keep_last": 2}
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(recipe, one) == one / "hf"  # the Python entry point, from a recipe dict
    run_sft(recipe, two, tmp_path, nproc=2)  # 8 rows a step: 2 ranks x 2 micro-batches of 2 rows

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(two)) == 4 and losses(two) == pytest.approx(losses(one), rel=1e-5)
    w1, w2 = load_file(one / "hf" / "model.safetensors"), load_file(two / "hf" / "model.safetensors")
    # Adam-type updates turn reduction-order noise in near-zero gradients into differences of ~1e-4 of weights that
    # move by ~1e-2 in these 4 steps; on an AVX2-only CPU the rarely seen embedding rows differ by up to 2.5e-3 (4e-4
    # of the tensor's norm), so each tensor is compared by its norm. A missed gradient reduction or another data
    # order would differ by the size of the updates themselves (~1e-2 relative).
    assert all((w1[k] - w2[k]).norm() <= 1e-3 * w1[k].norm() for k in w1)
    # resume: as if killed after the checkpoint of step 2 (the step-4 checkpoint and export never written)
    shutil.copy(two / "hf" / "model.safetensors", tmp_path / "straight.safetensors")
    shutil.rmtree(two / "checkpoints" / "step_00000004")
    shutil.rmtree(two / "hf")
    done = run_sft(recipe, two, tmp_path, nproc=2)
    assert "resuming from" in done.stdout + done.stderr
    assert len(losses(two)) == 4 and losses(two) == pytest.approx(losses(one), rel=1e-5)
    resumed, straight = load_file(two / "hf" / "model.safetensors"), load_file(tmp_path / "straight.safetensors")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    record = json.loads((two / "run.json").read_text())
    assert record["kind"] == "sft" and "hf/model.safetensors" in record["artifacts"]


def test_recipes_carry_the_spec_numbers(tmp_path):
    from apertus.checkpoint import save_model
    from apertus.config import model_config_from
    from apertus.model import build_model
    from apertus.train.posttrain import load_recipe
    from apertus.train.qrpo import parse_align_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    ckpt = tmp_path / "ckpt"
    save_model(build_model(model_config_from(dict(ph.SMALL)), seed=0), ckpt)
    over = [f"model.init_from={ckpt}"]
    names = ("tiny", "apertus-8b", "apertus-70b")
    sft = {n: load_recipe(root / f"sft_{n}.toml", parse_sft_recipe, over, world_size=1) for n in names}
    align = {n: load_recipe(root / f"align_{n}.toml", parse_align_recipe, over, world_size=1) for n in names}
    for n, lr, gbs in (("apertus-8b", 5e-6, 512), ("apertus-70b", 2e-6, 1024)):  # docs/recipe.md §6.1
        r = sft[n]
        assert (r.optim.lr, r.train.batch_size, r.train.seq_len, r.train.epochs) == (lr, gbs, 4096, 1)
        assert r.optim.betas[:2] == [0.9, 0.999] and r.optim.alpha == 8 and r.optim.t_alpha == r.optim.t_beta3 == 0
        assert (r.optim.warmup_ratio, r.optim.weight_decay, r.train.grad_clip, r.data.packing) == (0.03, 0, 1.0, False)
    for n, lr, gbs in (("apertus-8b", 5e-7, 512), ("apertus-70b", 1e-7, 1024)):  # docs/recipe.md §6.2
        r = align[n]
        assert (r.optim.lr, r.train.batch_size, r.optim.betas, r.optim.warmup_ratio) == (lr, gbs, [0.9, 0.999, 0.99],
                                                                                         0.1)
        assert (r.loss.name, r.loss.beta, r.loss.max_beta, r.loss.length_normalize) == ("qrpo", 5.0, 0.1, True)
        assert (r.sampling.n, r.sampling.temperature, r.reward.kind) == (10, 1.0, "model")
        assert (r.pairs.rule, r.pairs.rejected_quantile, r.data.dataset_candidates) == ("apertus", 0.2, True)
    assert align["tiny"].reward.functions == {"gsm8k_correct": 1.0, "gsm8k_format": 1.0}
