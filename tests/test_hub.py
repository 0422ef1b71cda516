"""Checkpoints by Hugging Face hub id (`org/name[@revision]`), resolved by huggingface_hub from a real on-disk cache.

Nothing can be downloaded here, so the cache is laid out as huggingface_hub writes it (tests/hub_helpers.py) and read
with HF_HUB_OFFLINE=1: subprocesses get it through the environment (HF_HUB_CACHE, HF_HUB_OFFLINE), in-process tests
through huggingface_hub's constants (which it reads from the environment once, at import).
"""

from __future__ import annotations

import subprocess
import sys

import huggingface_hub
import pytest
import torch
from hub_helpers import add_to_hub_cache, offline_env
from huggingface_hub import constants
from server_helpers import random_checkpoint

from apertus import load_model
from apertus.checkpoint import HUB_FILES, resolve_checkpoint_dir
from apertus.infer import Engine, SamplingParams
from apertus.tokenizer import Tokenizer

REPO = "swiss-ai-test/Apertus-Tiny-Instruct"
PROMPT = [1, 1010, 2025, 3030, 4040]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(cache, local folder of main, local folder of the older revision, old commit): two revisions of one repo,
    `main` and the tag-like branch `v1` pointing at different weights."""
    root = tmp_path_factory.mktemp("hub")
    old, new = random_checkpoint(root / "old", seed=1), random_checkpoint(root / "new", seed=2)
    cache = root / "cache"
    old_commit = add_to_hub_cache(cache, REPO, old, branch="v1")
    add_to_hub_cache(cache, REPO, new, branch="main")
    return cache, new, old, old_commit


@pytest.fixture
def offline(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub[0]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([PROMPT]))


def test_the_cache_is_what_huggingface_hub_reads(hub):
    cache, new, _, old_commit = hub
    [repo] = huggingface_hub.scan_cache_dir(cache).repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    refs = {r.commit_hash: set(r.refs) for r in repo.revisions}
    assert refs[old_commit] == {"v1"} and {"main"} in refs.values()
    for rev in repo.revisions:
        assert {f.file_name for f in rev.files} == {p.name for p in new.iterdir()}
    # the weights are blobs named by their sha256, as an LFS file's ETag
    st = next(f for f in next(iter(repo.revisions)).files if f.file_name == "model.safetensors")
    assert len(st.blob_path.name) == 64


def test_hub_id_gives_what_the_local_folder_gives(offline):
    _, new, old, old_commit = offline
    assert torch.equal(logits(load_model(REPO)), logits(load_model(new)))
    assert torch.equal(logits(load_model(f"{REPO}@{old_commit}")), logits(load_model(old)))
    assert torch.equal(logits(load_model(f"{REPO}@v1")), logits(load_model(old)))
    assert not torch.equal(logits(load_model(REPO)), logits(load_model(old)))  # the revisions differ
    assert resolve_checkpoint_dir(REPO).parent.parent.name == "models--swiss-ai-test--Apertus-Tiny-Instruct"


def test_engine_by_hub_id_generates_the_same_tokens_with_the_checkpoints_tokenizer(offline):
    _, new, _, _ = offline
    params = SamplingParams(temperature=0, max_tokens=12)
    with Engine(REPO, cache_gb=0.02) as by_id, Engine(new, cache_gb=0.02) as by_path:
        [a], [b] = by_id.generate(["Grüezi mitenand"], params), by_path.generate(["Grüezi mitenand"], params)
        assert by_id.tokenizer is not None and by_id.defaults == by_path.defaults
    assert a.output_ids == b.output_ids and a.text == b.text and len(a.output_ids) > 0


def test_a_local_path_wins_over_a_hub_id(offline, tmp_path, monkeypatch):
    _, _, old, _ = offline
    monkeypatch.chdir(tmp_path)
    random_checkpoint(tmp_path / REPO, seed=1)  # ./swiss-ai-test/Apertus-Tiny-Instruct holds the old weights
    assert resolve_checkpoint_dir(REPO).resolve() == (tmp_path / REPO).resolve()
    assert torch.equal(logits(load_model(REPO)), logits(load_model(old)))


def test_sft_init_eval_scorer_and_export_take_a_hub_id(offline, tmp_path):
    from apertus.cli import main
    from apertus.eval.loglik import Scorer
    from apertus.train.sft import parse_model

    _, new, _, _ = offline
    cfg, init_from = parse_model({"init_from": REPO})
    assert cfg == load_model(new).config and torch.equal(logits(load_model(init_from)), logits(load_model(new)))
    scorer = Scorer.from_pretrained(REPO, tokenizer=None)  # the tokenizer comes from the snapshot
    assert scorer.tokenizer.inner.to_str() == Tokenizer.from_file(new).inner.to_str()
    assert torch.equal(logits(scorer.model), logits(load_model(new)))
    assert main(["export", REPO, "--dtype", "fp32", "--out", str(tmp_path / "fp32")]) == 0
    assert torch.equal(logits(load_model(tmp_path / "fp32")), logits(load_model(new)))
    assert (tmp_path / "fp32" / "tokenizer.json").read_bytes() == (new / "tokenizer.json").read_bytes()
    import gguf

    assert main(["export", f"{REPO}@v1", "--format", "gguf", "--dtype", "fp32", "--out", str(tmp_path / "m.gguf")]) == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "apertus"
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    old_emb = load_model(offline[2]).model.embed_tokens.weight.detach().numpy()
    assert (emb.data.reshape(old_emb.shape) == old_emb).all()  # the revision asked for, not main


def test_only_checkpoint_files_are_asked_for():
    # no pickles, no GGUF or original/ Megatron files: what a checkpoint needs and nothing else
    from fnmatch import fnmatch

    wanted = ["config.json", "model-00001-of-00004.safetensors", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "generation_config.json", "chat_template.jinja", "special_tokens_map.json"]
    unwanted = ["pytorch_model.bin", "model.gguf", "README.md", "original/consolidated.pth", "optimizer.pt"]
    assert all(any(fnmatch(f, p) for p in HUB_FILES) for f in wanted)
    assert not any(fnmatch(f, p) for f in unwanted for p in HUB_FILES)


def _apertus(args, env, cwd=None):
    return subprocess.run([sys.executable, "-m", "apertus.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_cli_generate_by_hub_id_matches_the_folder(hub):
    cache, new, old, old_commit = hub
    args = ["--temperature", "0", "--max-tokens", "10", "--prompt", "Grüezi", "--device", "cpu"]
    env = offline_env(cache)
    by_id = _apertus(["generate", REPO, *args], env)
    by_rev = _apertus(["generate", f"{REPO}@{old_commit}", *args], env)
    by_path = [_apertus(["generate", str(p), *args], env) for p in (new, old)]
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout == by_path[0].stdout and by_rev.stdout == by_path[1].stdout
    assert by_id.stdout != by_rev.stdout


@pytest.mark.parametrize("command", [["chat"], ["serve"], ["info"], ["eval"], ["export"]])
def test_an_unknown_id_is_a_one_line_error_naming_it_and_what_was_tried(hub, command, tmp_path):
    cache = hub[0]
    r = _apertus([*command, "nobody-here/no-such-model@v9"] + (["--tasks", "xcopa"] if command == ["eval"] else []),
                 offline_env(cache), cwd=tmp_path)
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    line = lines[0]
    assert "nobody-here/no-such-model" in line and "v9" in line and str(cache) in line and "HF_HUB_OFFLINE" in line


def test_a_path_that_is_neither_a_directory_nor_an_id_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        resolve_checkpoint_dir(tmp_path / "missing" / "deeper" / "model")
