"""The speedrun end to end (`apertus speedrun --smoke`): killed in the middle, resumed, then every artifact loaded
by a reader we did not write: the HF export by transformers (logits against ours), the GGUF by gguf-py's reader
(architecture, tensor names and count, weights equal to the checkpoint's), the cards by a YAML parser.
It runs from a copy of the repository with nothing beside it, $APERTUS_DATA unset and an empty cache, from another
working directory: what a `git clone` gives a newcomer.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from apertus.speedrun import STAGES

pytestmark = pytest.mark.slow


def _speedrun(out, *extra):
    return [sys.executable, "-m", "apertus.cli", "speedrun", "--smoke", "--out", str(out), *extra]


ROOT = Path(__file__).resolve().parents[1]


def _checkout_alone(tmp):
    """The repository's files (tracked and not ignored, as a clone of this state has them) copied to `tmp/apertus`
    with nothing beside them; the environment of a newcomer: no APERTUS_DATA, an empty cache. Only the rebuilt
    tokenizer is carried over when this machine has it (its rebuild is tested in test_tokenizer)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    repo = tmp / "apertus"
    for rel in filter(None, files.split("\0")):
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    cache = tmp / "cache"
    tok = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "apertus" / "apertus_tokenizer"
    if (tok / "tokenizer.json").is_file():
        shutil.copytree(tok, cache / "apertus" / "apertus_tokenizer")
    env = {k: v for k, v in os.environ.items() if k not in ("APERTUS_DATA", "PYTHONPATH")}
    return repo, {**env, "PYTHONPATH": str(repo / "src"), "XDG_CACHE_HOME": str(cache), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A smoke speedrun killed (SIGTERM) as its SFT stage starts, then rerun to the end."""
    tmp = tmp_path_factory.mktemp("speedrun")
    out = tmp / "smoke"
    repo, env = _checkout_alone(tmp)
    p = subprocess.Popen(_speedrun(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         cwd=tmp)
    first = []
    for line in p.stdout:
        first.append(line)
        if re.match(r"== \[\d/\d\] sft ", line):
            p.send_signal(signal.SIGTERM)
            break
    first.append(p.communicate(timeout=600)[0])
    assert p.returncode != 0, "".join(first)
    done = {s: (out / s / "DONE").stat().st_mtime_ns for s in STAGES if (out / s / "DONE").is_file()}
    second = subprocess.run(_speedrun(out), capture_output=True, text=True, timeout=900, env=env, cwd=tmp)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {"out": out, "done_after_kill": done, "log": second.stdout, "repo": repo, "cache": tmp / "cache"}


def test_ran_on_the_corpora_unpacked_from_the_lone_checkout(run):
    unpacked = run["cache"] / "apertus" / "data"
    assert sorted(p.name for p in unpacked.iterdir()) == sorted(
        p.name for p in (run["repo"] / "data").iterdir() if (p / "SHA256SUMS").is_file())
    assert (unpacked / "udhr" / ".embedded").is_file() and (unpacked / "sib200" / "annotated").is_dir()


def test_resume_skips_finished_stages(run):
    out, done = run["out"], run["done_after_kill"]
    assert list(done) == ["tokenizer", "data", "pretrain"]
    for stage, mtime in done.items():
        assert f"{stage}: done" in run["log"]
        assert (out / stage / "DONE").stat().st_mtime_ns == mtime  # not redone
    for stage in STAGES:
        assert (out / stage / "DONE").is_file()
        assert f"] {stage}  (elapsed" in run["log"] or stage in done


def test_speedrun_json_records_time_and_tokens(run):
    state = json.loads((run["out"] / "speedrun.json").read_text())
    assert list(state["stages"]) == list(STAGES)
    for r in state["stages"].values():
        assert r["seconds"] >= 0 and r["tokens"] >= 0
    # the smoke pretraining recipe: 4 + 2 steps of 1,024 tokens
    assert state["stages"]["pretrain"]["tokens"] == 6 * 1024
    assert state["stages"]["data"]["tokens"] > 0 and state["stages"]["sft"]["tokens"] > 0


def test_report_sections_and_links(run):
    out = run["out"]
    report = (out / "report.md").read_text()
    for heading in ("## System", "## Time and tokens per stage", "## Data funnel", "## Tokenizer fertility",
                    "## Loss curves", "## What each stage shows, against its baseline",
                    "## Samples during pretraining", "## Bits per byte by language", "## Evaluation",
                    "## Sample chats", "## Cards and exports"):
        assert heading in report
    # each stage's effect beside its baseline, the aim marked (values are not checked: the smoke run is too short)
    effects = report.split("## What each stage shows")[1].split("\n## ")[0]
    for measure in ("unigram", "language identification", "end their turn", "held-out mean reward"):
        assert measure in effects
    assert effects.count("met") >= 4
    samples = report.split("## Samples during pretraining")[1].split("\n## ")[0]
    assert "| Die Schweiz ist |" in samples and "step 3" in samples and "step 6" in samples
    assert "torch 2." in report and "transformers" in report
    assert "out:train" in report  # the funnel
    assert "| chance |" in report and "flores_bpb_eng_Latn" in report and "gsm8k" in report
    links = re.findall(r"\]\(([^)]+)\)", report)
    for target in ("loss_curves.png", "eval/base/flores_bpb.png", "tokenizer/fertility/fertility.png",
                   "export/hf", "export/apertus-speedrun.gguf", "cards/README.md"):
        assert target in links
    for link in links:
        assert (out / link).exists(), link
    for png in ("loss_curves.png", "eval/base/flores_bpb.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # `apertus report` regenerates it
    (out / "report.md").unlink()
    r = subprocess.run([sys.executable, "-m", "apertus.cli", "report", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "report.md").read_text() == report


def test_hf_export_loads_in_transformers(run):
    from apertus.checkpoint import load_model
    from apertus.tokenizer import Tokenizer

    hf = run["out"] / "export" / "hf"
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ours = load_model(hf, dtype=torch.float32)
    text = "Grüezi! Natalia sold 48 clips in April."
    ids = Tokenizer.from_file(hf).encode(text)
    assert transformers.AutoTokenizer.from_pretrained(hf)(text)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = ref(x).logits
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(ours(x), logits, atol=1e-4, rtol=1e-4)


def test_gguf_reads_back(run):
    out = run["out"] / "export"
    reader = gguf.GGUFReader(out / "apertus-speedrun.gguf")
    assert reader.fields["general.architecture"].contents() == "apertus"
    hf = load_file(out / "hf" / "model.safetensors")
    config = json.loads((out / "hf" / "config.json").read_text())
    # every HF tensor but the per-layer xIELU scalars (GGUF metadata), plus llama3 RoPE factors when scaled
    expected = sum(".act_fn." not in k for k in hf) + (config["rope_parameters"]["rope_type"] == "llama3")
    names = [t.name for t in reader.tensors]
    assert len(names) == expected
    assert sum(n.startswith("blk.") for n in names) == 10 * config["num_hidden_layers"]  # 4 norms, q k v o, up, down
    alpha_p = reader.fields["xielu.alpha_p"].contents()
    assert len(alpha_p) == config["num_hidden_layers"]
    np.testing.assert_allclose(alpha_p[0], hf["model.layers.0.mlp.act_fn.alpha_p"].item(), rtol=1e-6)
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    np.testing.assert_array_equal(np.asarray(emb.data), hf["model.embed_tokens.weight"].float().numpy())
    assert reader.fields["tokenizer.chat_template"].contents().startswith("{")


def test_cards(run):
    cards = run["out"] / "cards"
    card = (cards / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"].lower() == "apache-2.0"
    data_card = (cards / "DATA_CARD.md").read_text()
    for source in ("udhr", "flores", "gsm8k"):
        assert source in data_card
    assert (cards / "EU_PUBLIC_SUMMARY.md").read_text().strip()


def test_rerun_one_stage_only(run):
    out = run["out"]
    before = {s: (out / s / "DONE").stat().st_mtime_ns for s in STAGES}
    r = subprocess.run(_speedrun(out, "--stages", "cards"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    after = {s: (out / s / "DONE").stat().st_mtime_ns for s in STAGES}
    assert [s for s in STAGES if after[s] != before[s]] == ["cards"]


def test_refuses_other_mode_and_unknown_stage(run):
    r = subprocess.run([sys.executable, "-m", "apertus.cli", "speedrun", "--out", str(run["out"])],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "choose another --out" in r.stderr
    r = subprocess.run(_speedrun(run["out"], "--stages", "sft,dance"), capture_output=True, text=True)
    assert r.returncode == 2 and "unknown stage" in r.stderr


@pytest.mark.parametrize("budget", ["demo", "hour"])
def test_budgets_keep_sft_qrpo_and_eval_data_apart(budget):
    """Each budget's SFT conversations, QRPO prompts and held-out prompts are disjoint rows of GSM8K."""
    from apertus.config import load_toml
    from apertus.speedrun import BUDGETS, RECIPES
    from apertus.train.recipe import apply_override

    sizes = BUDGETS[budget]
    recipes = {"sft": load_toml(RECIPES / "sft_tiny.toml"), "align": load_toml(RECIPES / "align_tiny.toml")}
    for stage, recipe in recipes.items():
        for item in sizes[stage]:
            apply_override(recipe, item)
    used = {}  # (split, row) -> what reads it
    sft, align = recipes["sft"]["data"], recipes["align"]["data"]
    for what, sources in (("sft", sft["sources"]), ("sft val", sft["val_sources"]), ("qrpo", align["prompts"]),
                          ("qrpo eval", align["eval_prompts"])):
        for s in sources:
            split = Path(s["path"]).stem
            for row in range(s.get("skip", 0), s.get("skip", 0) + s["limit"]):
                assert (split, row) not in used, (budget, what, split, row, used[split, row])
                used[split, row] = what
    assert {split for split, _ in used} == {"train", "test"}


def test_budget_is_checked(tmp_path):
    from apertus.speedrun import speedrun

    with pytest.raises(ValueError, match="unknown budget 'week'"):
        speedrun(tmp_path, budget="week")
    with pytest.raises(ValueError, match="--smoke and --budget exclude each other"):
        speedrun(tmp_path, smoke=True, budget="hour")
