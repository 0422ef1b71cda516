"""The `apertus` argument parser: eval sub-commands, engine options that follow the Python API, info's memory model."""

from __future__ import annotations

import dataclasses
import inspect
import json
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


def test_data_build_manifest_verify_and_info(tmp_path, capsys):
    """`data build` prints the funnel and totals and records run.json; `manifest` rewrites it; `verify` exits 1 on a
    changed shard, naming it; `data info` prints the funnel and the stages."""
    from compliance_helpers import corpus, recipe

    r = recipe(corpus(tmp_path))
    src = [f'[[sources]]\nname = "{s["name"]}"\nreader = "jsonl"\npath = "{s["path"]}"\nkind = "web"\n'
           for s in r["sources"]]
    stages = ['[[stages]]\nname = "web-first"\ntokens = 4000\nsources = {web = 1.0}\n',
              '[[stages]]\nname = "mix"\nsources = {web = 0.5, books = 0.5}\n']
    toml = tmp_path / "fixture.toml"
    toml.write_text(f'name = "fixture"\n[dataset]\ntokenizer = "{r["dataset"]["tokenizer"]}"\nseed = 0\n'
                    'shard_tokens = 1500\nval_fraction = 0.1\nval_min_docs = 5\n[executor]\ntasks = 1\nworkers = 1\n'
                    '[steps.pii]\n' + "\n".join(src + stages))
    d = tmp_path / "built"
    assert main(["data", "build", str(toml), "--out", str(d)]) == 0
    out = capsys.readouterr().out
    man = json.loads((d / "manifest.json").read_text())
    tokens = sum(s["n_tokens"] for s in man["shards"])
    assert out.startswith(f"building {toml} -> {d}\n") and "languages in the training split: 1" in out
    assert re.search(rf"{len(man['shards'])} shard\(s\), {tokens:,} tokens, [\d.]+s; manifest: {d}/manifest.json", out)
    run = json.loads((d / "run.json").read_text())
    assert run["kind"] == "data" and run["tokens"] == tokens and run["wall_time_s"] > 0

    assert main(["manifest", str(d)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {d}/run.json (data: {len(run['artifacts'])} artifacts hashed, "
                                              f"tokens {tokens}, energy estimate ")
    assert main(["verify", str(d)]) == 0
    assert capsys.readouterr().out.endswith("files checked, all hashes match\n")
    assert main(["card", str(d), "--out", str(tmp_path / "card")]) == 0
    written = ["README.md", "DATA_CARD.md", "EU_PUBLIC_SUMMARY.md", "card_trace.json"]
    assert capsys.readouterr().out == "".join(f"wrote {tmp_path / 'card' / name}\n" for name in written)
    shard = d / man["shards"][1]["path"]
    shard.write_bytes(shard.read_bytes()[::-1])
    assert main(["verify", str(d)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"MISMATCH {shard}: sha256 differs from the recorded one" and lines[-1].endswith("1 problem(s)")

    assert main(["data", "info", str(d)]) == 0
    out = capsys.readouterr().out
    assert "out:train" in out and "stage web-first:" in out and "stage mix:" in out


def test_report_lm_eval_hook_and_hash_list_print_what_they_did(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2  # not a speedrun directory: one line, exit 2
    assert capsys.readouterr().err.startswith(f"apertus report: error: {tmp_path}: no speedrun.json")
    (tmp_path / "speedrun.json").write_text(json.dumps({"mode": {"smoke": True}, "stages": {}}))
    assert main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'report.md'}\n" and (tmp_path / "report.md").is_file()

    assert main(["eval", "lm-eval-hook", "--site-dir", str(tmp_path)]) == 0
    files = [tmp_path / "apertus_lm_eval_hook.py", tmp_path / "apertus-lm-eval.pth"]
    assert capsys.readouterr().out == f"installed {files[0]}, {files[1]}\n" and all(f.is_file() for f in files)
    assert main(["eval", "lm-eval-hook", "--site-dir", str(tmp_path), "--uninstall"]) == 0
    assert capsys.readouterr().out == f"removed {files[0]}, {files[1]}\n" and not any(f.exists() for f in files)

    requests = tmp_path / "requests.txt"
    requests.write_text("Jane Doe\n\nJohn Q Public\n")
    assert main(["redact", "--make-hash-list", str(requests)]) == 2  # --out is needed
    assert "--make-hash-list needs --out FILE" in capsys.readouterr().err
    assert main(["redact", "--make-hash-list", str(requests), "--out", str(tmp_path / "hl.json")]) == 0
    hl = json.loads((tmp_path / "hl.json").read_text())
    assert capsys.readouterr().out == (f"wrote {tmp_path / 'hl.json'}: {len(hl['hashes'])} salted hashes "
                                       f"(up to {hl['max_words']} words)\n") and len(hl["hashes"]) == 2
