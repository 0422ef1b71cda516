"""Recipes: errors that name the key, the reference recipes' plan (docs/recipe.md §4 numbers), stage switches (data
seed, batch size, RoPE θ, constant-LR warmup), checkpoint pruning, the `apertus train` / `apertus export` commands."""

import json
from pathlib import Path

import pytest
import torch
import train_data

from apertus.checkpoint import save_model
from apertus.cli import main as cli
from apertus.config import ApertusConfig
from apertus.model import build_model
from apertus.train.checkpointing import complete_checkpoints, save_checkpoint
from apertus.train.distributed import Dist
from apertus.train.optim import build_optimizer
from apertus.train.pretrain import PretrainSource, pretrain
from apertus.train.recipe import load_recipe, parse_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("change,message", [
    ({"bogus": {}}, "unknown section(s) bogus"),
    ({"train": {"lr": 1e-3}}, "[train] unknown key(s) lr"),
    ({"train": {"steps": "ten"}}, "[train] steps must be a number"),
    ({"train": {"compile": 1}}, "[train] compile must be true or false"),
    ({"train": {"dtype": "fp16"}}, "[train] dtype 'fp16' must be 'bf16', 'fp32' or 'auto'"),
    ({"train": {"global_batch_tokens": 1000}}, "global_batch_tokens 1,000 is not divisible by seq_len x micro_batch"),
    ({"train": {"seq_len": 100_000}}, "seq_len 100000 exceeds the model's max_position_embeddings"),
    ({"optim": {"betas": [0.9, 0.999]}}, "[optim] betas must have three values"),
    ({"optim": {"min_lr": 1.0}}, "min_lr <= lr"),
    ({"schedule": {"decay": "step"}}, "[schedule] decay 'step'"),
    ({"model": {"preset": "tiny", "layers": 3}}, "[model]: unknown key(s) layers"),
    ({"stages": [{"name": "a", "steps": 2, "sequence": 8}]}, "[stages.0] unknown key(s) sequence"),
    ({"stages": [{"name": "a"}]}, "[stages.0 (a)] needs steps or tokens"),
])
def test_bad_recipes_fail_before_any_work_naming_the_key(change, message):
    table = train_data.tiny_recipe()
    for k, v in change.items():
        table[k] = dict(table.get(k, {}), **v) if isinstance(v, dict) and k != "bogus" else v
    with pytest.raises(ValueError) as e:
        parse_recipe(table)
    assert message in str(e.value)


def test_cli_reports_recipe_errors_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nseq_len = 4096\nglobal_batch_tokens = 4096\nmicro_batch = 2\nsteps = 1\n')
    assert cli(["train", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "global_batch_tokens 4,096 is not divisible" in err
    assert cli(["train", str(RECIPES / "apertus-8b.toml"), "--dry-run", "--gpus", "1000"]) == 2
    assert "[stages.0 (stage1)] global_batch_tokens" in capsys.readouterr().err
    # a dataset that is not there: an error before the model is built
    assert cli(["train", str(RECIPES / "tiny.toml"), "--out", str(tmp_path / "r"), "--set",
                f"data.dataset={tmp_path / 'nope'}"]) == 2
    assert "dataset directory not found" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_reference_recipes_plan_matches_spec(capsys):
    r8 = load_recipe(RECIPES / "apertus-8b.toml", world_size=128)
    starts = {s.name: s.start_tokens for s in r8.stages}
    # docs/recipe.md §4.1/4.2: stage 3 at 7.038T (step 1,678,000, GBS doubled), stage 4 at 12.000T, stage 5 = cooldown
    # at 13.345T
    assert starts["stage3"] == 1_678_000 * 1024 * 4096 == 7_038_042_112_000
    assert round(starts["stage4"] / 1e12, 3) == 12.000 and round(starts["stage5"] / 1e12, 3) == 13.346
    assert r8.stages[3].start_step + r8.stages[3].steps == 2_627_139  # total pretraining iterations
    assert abs(r8.schedule_tokens - 15e12) < 1e7
    r70 = load_recipe(RECIPES / "apertus-70b.toml", world_size=256)
    s70 = {s.name: round(s.start_tokens / 1e12, 3) for s in r70.stages}
    assert (s70["stage1-gbs4096"], s70["stage2"], s70["stage3"], s70["stage4"], s70["stage5"]) == (
        4.392, 5.166, 8.846, 12.209, 13.431)
    assert r70.stages[5].start_step + r70.stages[5].steps == 1_155_828
    # the 8B learning rate at chosen steps: warmup (4,000 steps of 4.19M tokens), stable, 1-sqrt cooldown, long context
    assert r8.lr_at(0, 0) == 0.0 and r8.lr_at(2000, 2000 * 4194304) == pytest.approx(5.5e-5)
    assert r8.lr_at(1_000_000, 1_000_000 * 4194304) == pytest.approx(1.1e-4)
    end = r8.schedule_tokens
    quarter = end - 0.75 * r8.schedule.cooldown_tokens  # a quarter into the cooldown: coeff 1 - sqrt(1/4) = 1/2
    assert r8.lr_at(2_500_000, quarter) == pytest.approx(1.1e-5 + 0.5 * 9.9e-5)
    lc = r8.stages[4]
    assert (lc.name, lc.seq_len, lc.rope_theta) == ("lc-8k", 8192, 1e6)
    assert r8.lr_at(lc.start_step, end) == 0.0 and r8.lr_at(lc.start_step + 75, end) == pytest.approx(5.5e-6)
    assert r8.lr_at(lc.start_step + 1000, end) == pytest.approx(1.1e-5)
    assert not r8.stages[-1].document_masking and r8.stages[-1].rope_theta == 12e6
    assert cli(["train", str(RECIPES / "apertus-8b.toml"), "--dry-run", "--gpus", "128"]) == 0
    text = capsys.readouterr().out
    assert "2,653,899 steps" in text and "GiB per GPU" in text and "FLOPs" in text and "days at 35% MFU" in text
    assert cli(["train", str(RECIPES / "apertus-70b.toml"), "--dry-run", "--gpus", "256"]) == 0
    assert "does NOT fit" in capsys.readouterr().out  # 64k context without context parallelism
    assert cli(["train", str(RECIPES / "tiny.toml"), "--dry-run"]) == 0


def test_auto_dtype_is_bf16_only_where_bf16_products_are_fast():
    """The tiny recipes say "auto": bf16 autocast on a GPU or a CPU with bf16 matrix units, fp32 elsewhere."""
    fast = torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert parse_recipe(train_data.tiny_recipe(dtype="auto")).train.dtype == ("bf16" if fast else "fp32")
    assert load_recipe(RECIPES / "tiny.toml").train.dtype == ("bf16" if fast else "fp32")
    assert load_recipe(RECIPES / "apertus-8b.toml").train.dtype == "bf16"


class SpyLoaders:
    def __init__(self):
        self.made = []

    def __call__(self, stage):
        self.made.append((stage.name, stage.data, stage.seed, stage.seq_len))
        return train_data.make_loader()(stage)


def staged_recipe():
    table = train_data.tiny_recipe(steps=0, dtype="bf16")
    table["schedule"] = {"warmup_tokens": 0, "cooldown_tokens": 0}
    table["checkpoint"] = {"every": 3, "keep_last": 5}
    table["stages"] = [
        {"name": "s1", "data": "a", "seed": 1, "steps": 2},
        {"name": "s1-big", "data": "a", "seed": 1, "steps": 2, "global_batch_tokens": 1024},  # same stream, 2x batch
        {"name": "long", "data": "b", "seed": 7, "steps": 2, "seq_len": 128, "global_batch_tokens": 1024,
         "micro_batch": 2, "rope_theta": 1e6, "lr": 1e-3, "warmup_steps": 2, "document_masking": False},
    ]
    return parse_recipe(table)


def test_stages_switch_data_seed_batch_theta_and_lr(tmp_path):
    recipe, spy = staged_recipe(), SpyLoaders()
    pretrain(recipe, tmp_path / "run", Dist(), make_loader=spy)
    assert spy.made == [("s1", "a", 1, 64), ("long", "b", 7, 128)]  # "s1-big" continued the same stream
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows] == [512, 1024, 2048, 3072, 4096, 5120]
    assert [r["lr"] for r in rows] == pytest.approx([3e-3, 3e-3, 3e-3, 3e-3, 0.0, 5e-4])
    # the loss of a step sees the stage of that step's batches, up to its last step
    model = build_model(recipe.model, seed=0)
    source = PretrainSource(recipe, model, Dist(), train_data.make_loader())
    seen = []
    for _ in range(6):
        source.next_step()
        seen.append(source.stage.name)
    assert seen == ["s1", "s1", "s1-big", "s1-big", "long", "long"]
    # resuming inside the long-context stage restores its θ and data position
    model = build_model(recipe.model, seed=0)
    source = PretrainSource(recipe, model, Dist(), train_data.make_loader())
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000006" / "rank00000.json").read_text())
    source.load_state_dict(state["source"])
    assert model.config.rope_theta == 1e6 and source.stage.name == "long" and not source.stage.document_masking
    assert source.loader.state_dict() == {"pos": 2 * 4 * 2}  # two steps of four micro-batches of two rows


def test_export_command_writes_a_transformers_checkpoint_with_tokenizer(tmp_path, apertus_tokenizer_json, capsys):
    import transformers

    recipe = parse_recipe(train_data.tiny_recipe(steps=4))
    pretrain(recipe, tmp_path / "run", Dist(), make_loader=train_data.make_loader())
    out = tmp_path / "hf"
    assert cli(["export", str(tmp_path / "run"), "--out", str(out), "--dtype", "bf16", "--tokenizer",
                str(apertus_tokenizer_json)]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == recipe.model.vocab_size
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Hello").input_ids[0] == 1
    assert cli(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "no complete training checkpoint" in capsys.readouterr().err
    assert cli(["export", str(tmp_path / "run"), "--dtype", "f16"]) == 2
    assert "--dtype f16 is for --format gguf" in capsys.readouterr().err


def test_export_command_writes_gguf_that_gguf_py_reads(tmp_path, capsys):
    """`apertus export RUN --format gguf`: read back with gguf-py's GGUFReader (llama.cpp's own reader); tensor names
    from gguf-py's Apertus name map, values equal to the checkpoint's weights."""
    import gguf
    import numpy as np

    from apertus.tokenizer import tiny_tokenizer

    run = tmp_path / "my-run"
    tok = tiny_tokenizer(run / "tokenizer")  # the run's own tokenizer, found by default (2,048 ids)
    cfg = ApertusConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1)
    model = build_model(cfg, seed=0)
    save_checkpoint(run / "checkpoints", 3, model, build_optimizer(model, lr=1e-3), Dist(), {"tokens": 0})
    out = tmp_path / "m.gguf"
    assert cli(["export", str(run), "--format", "gguf", "--dtype", "fp32", "--out", str(out)]) == 0
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "apertus"
    assert reader.fields["apertus.block_count"].contents() == 2
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.APERTUS, 2)
    weights = {k: v for k, v in model.state_dict().items() if ".act_fn." not in k}  # xIELU scalars: metadata
    tensors = {t.name: t for t in reader.tensors}
    expected = {names.get_name(k, try_suffixes=(".weight",)) for k in weights} | {"rope_freqs.weight"}  # llama3 RoPE
    assert set(tensors) == expected and len(reader.tensors) == len(expected)
    for key, value in weights.items():
        np.testing.assert_array_equal(tensors[names.get_name(key, try_suffixes=(".weight",))].data, value.numpy())
    assert cli(["export", str(run), "--format", "gguf"]) == 0  # default: bf16 next to the run
    default = run / "export" / "my-run-step_00000003-bf16.gguf"
    assert str(default) in capsys.readouterr().out
    types = {t.tensor_type for t in gguf.GGUFReader(default).tensors}
    assert types == {gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.F32}  # matrices bf16, norms f32
    assert cli(["export", str(run), "--format", "gguf", "--quant", "q8_0"]) == 0
    q8 = run / "export" / "my-run-step_00000003-q8_0.gguf"
    assert f"wrote {q8} (GGUF for llama.cpp, q8_0)" in capsys.readouterr().out
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(q8).tensors}
    assert types["blk.0.ffn_up.weight"] == types["output.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # rows 48 long do not fill 32-blocks
    assert not [p for p in (run / "export").iterdir() if p.name.startswith(".")]  # the temporary HF folder is gone


def test_pruning_keeps_the_last_k_and_the_permanent_checkpoints(tmp_path):
    model = build_model(ApertusConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1), seed=0)
    opt = build_optimizer(model, lr=1e-3)
    for step in range(1, 11):
        save_checkpoint(tmp_path, step, model, opt, Dist(), {"tokens": step}, keep_last=2, permanent_every=4)
    assert [p.name for p in complete_checkpoints(tmp_path)] == [
        "step_00000004", "step_00000008", "step_00000009", "step_00000010"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    import os
    import signal

    from apertus.train.loop import LoopConfig, train

    recipe = parse_recipe(train_data.tiny_recipe(steps=50))
    model = build_model(recipe.model, seed=0)
    loaders = train_data.make_loader()
    source = PretrainSource(recipe, model, Dist(), loaders)

    def loss_fn(m, batch):
        from apertus.train.loss import lm_loss

        if source.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler does before preempting the job
        return lm_loss(m, batch)

    cfg = LoopConfig(out_dir=tmp_path, steps=50, lr=lambda s, t: 1e-3, dtype="fp32", peak_flops=1e12, log_every=100)
    result = train(model, build_optimizer(model, lr=1e-3), source, loss_fn, cfg, Dist())
    assert result["step"] == 3 and [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == [
        "step_00000003"]
    assert torch.is_tensor(model.lm_head.weight)


def test_init_from_a_checkpoint_takes_its_architecture_and_weights(tmp_path):
    from apertus.train.pretrain import build_model_for

    base = build_model(ApertusConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0), seed=3)
    save_model(base, tmp_path / "base")
    table = {"model": {"init_from": str(tmp_path / "base"), "rope_theta": 1e6},
             "train": {"seq_len": 16, "global_batch_tokens": 32, "micro_batch": 2, "steps": 1}}
    recipe = parse_recipe(table)
    assert recipe.model.hidden_size == 32 and recipe.model.rope_theta == 1e6
    model = build_model_for(recipe.model, Dist(), init_from=recipe.init_from)
    for (k, a), (_, b) in zip(base.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert model.config.rope_theta == 1e6
    with pytest.raises(ValueError, match="preset or init_from"):
        parse_recipe({"model": {"init_from": str(tmp_path / "base"), "preset": "tiny"}})
