"""The `apertus` argument parser: eval sub-commands, engine options that follow the Python API, info's memory model."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

from apertus.cli import build_parser, main
from apertus.config import preset
from apertus.infer import Engine, SamplingParams
from apertus.train.recipe import memory_per_gpu, parse_recipe


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_eval_sub_commands_and_the_short_form(tmp_path, capsys):
    tasks = parse("eval", "tasks", "ckpt", "--tasks", "xcopa, piqa", "--langs", "it")
    assert tasks.func.__name__ == "cmd_eval_tasks" and tasks.model == "ckpt" and tasks.tasks == ["xcopa", "piqa"]
    memo = parse("eval", "memorization", "ckpt", "--probes", "p.jsonl")
    assert memo.func.__name__ == "cmd_eval_memorization" and memo.probes_path == "p.jsonl" and memo.top_p == 0.9
    assert parse("eval", "lm-eval-hook", "--uninstall").uninstall is True
    # `apertus eval CKPT ...` is `apertus eval tasks CKPT ...`: the missing checkpoint is the error, one line, exit 2
    missing = str(tmp_path / "none")
    assert main(["eval", missing, "--tasks", "xcopa"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("apertus eval: error:") and missing in err[0]
    with pytest.raises(SystemExit) as e:  # a form that needs --probes says so as argparse does
        main(["eval", "memorization", "ckpt"])
    assert e.value.code == 2 and "--probes" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_engine_and_sampling_defaults_are_the_python_apis(command):
    args = parse(command, "ckpt")
    engine = {k: p.default for k, p in inspect.signature(Engine).parameters.items() if p.default is not p.empty}
    for name in ("tokenizer", "dtype", "device", "cache_gb", "quantize", "compile"):
        assert getattr(args, name) == engine[name], name
    if command == "serve":
        assert args.max_batch == engine["max_batch"] and args.max_queue == 256  # the server's own, smaller queue
        return
    fields = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        assert getattr(args, name) == fields[name], name
    assert args.max_tokens == {"generate": 128, "chat": 1024}[command]


def test_info_prints_the_recipes_memory_model(capsys):
    assert main(["info", "apertus-8b", "--seq-len", "4096", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    recipe = parse_recipe({"model": {"preset": "apertus-8b"},
                           "train": {"seq_len": 4096, "global_batch_tokens": 8 * 4096, "steps": 1}}, world_size=8)
    mem = memory_per_gpu(recipe, 8, recipe.stages[0])
    total = float(re.search(r"total ([\d,.]+) GiB", out).group(1).replace(",", ""))
    assert total == pytest.approx(sum(mem.values()) / 2**30, abs=0.051)
    state = float(re.search(r"AdEMAMix m1/m2/nu ([\d,.]+) GiB", out).group(1))
    assert state == pytest.approx(20 * preset("apertus-8b").num_params() / 8 / 2**30, abs=0.051)


def test_bad_input_is_argparse_exit_2(capsys):
    for argv in (["eval"], ["generate"], ["info", "tiny", "--gpus", "x"], ["serve", "m", "--dtype", "fp8"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
    capsys.readouterr()
