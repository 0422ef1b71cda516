"""Shared fixtures: the embedded data (apertus.embedded) and the real Apertus tokenizer (rebuilt from
mistral-common once per machine, or $APERTUS_DATA's copy; local files only, no hub)."""

import os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. Tests run an engine thread beside the
# main thread and launch subprocesses on 2 cores; spinning workers then starve each other (20x slowdowns seen).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from apertus.config import data_root  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def quant_cache(tmp_path_factory):
    """Engines started with quantize= keep their quantized layers here, not in the user's cache (subprocesses too)."""
    os.environ["APERTUS_QUANT_CACHE"] = str(tmp_path_factory.mktemp("quantized"))
    return os.environ["APERTUS_QUANT_CACHE"]


@pytest.fixture(scope="session")
def data_dir():
    root = data_root()
    if not (root / "udhr").is_dir():
        pytest.fail(f"the embedded corpora are not at {root} (APERTUS_DATA={os.environ.get('APERTUS_DATA')})")
    return root


@pytest.fixture(scope="session")
def apertus_tokenizer_dir(data_dir, tmp_path_factory):
    """A released-tokenizer folder as the instruct model ships it: tokenizer.json (apertus_tokenizer_path()), the
    instruct tokenizer_config.json and the chat templates (embedded). transformers' AutoTokenizer reads it."""
    from apertus.tokenizer import apertus_tokenizer_path

    d = tmp_path_factory.mktemp("apertus_tokenizer")
    (d / "tokenizer.json").symlink_to(apertus_tokenizer_path())
    for f in (data_dir / "apertus_tokenizer").iterdir():
        if f.suffix in (".json", ".jinja") and f.name != "tokenizer.json":
            (d / f.name).symlink_to(f)
    return d


@pytest.fixture(scope="session")
def apertus_tokenizer_json(apertus_tokenizer_dir):
    return apertus_tokenizer_dir / "tokenizer.json"


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """Our tiny model with a 2,048-id tokenizer trained on UDHR (cheap enough for end-to-end runs on CPU)."""
    import dataclasses

    from apertus import build_model, preset, save_model
    from apertus.tokenizer import tiny_tokenizer

    path = tmp_path_factory.mktemp("small")
    tok = tiny_tokenizer(path / "tok")
    cfg = dataclasses.replace(preset("tiny"), vocab_size=2048, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    save_model(build_model(cfg, seed=0), path / "model", extra_files={"tokenizer.json": tok.inner.to_str()})
    return path / "model"
