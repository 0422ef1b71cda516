"""Every exported checkpoint names its RoPE, and it survives apertus -> transformers -> apertus and the GGUF export.

References we did not write: transformers' `AutoModelForCausalLM.from_pretrained` and its `save_pretrained` (the
installed version), transformers' RoPE init functions, and gguf-py's GGUFReader. A config.json without an explicit
RoPE gets transformers' own Apertus default (llama3, θ 12M): every variant here but the release's own differs from
that default, so a dropped key shows up as a logit mismatch (test_the_bug_report_case_is_caught_by_the_comparison).
"""

import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from apertus import ApertusConfig, build_model, load_model, save_model
from apertus.config import LLAMA3_ROPE, load_config
from apertus.export_gguf import export_gguf

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}  # small: kept, blended and scaled frequencies all occur
VARIANTS = {  # name: (rope_scaling, rope_theta)
    "plain": (None, 10_000.0),
    "llama3": (LLAMA3_ROPE, 12_000_000.0),  # the release's RoPE exactly (all three regimes occur at head_dim 16)
    "plain-theta": (None, 12_000_000.0),  # transformers' default θ but no scaling: the case of the bug report
    "llama3-theta": (dict(LLAMA3, factor=4.0, high_freq_factor=2.0), 250_000.0),
}
DTYPES = {"fp32": (torch.float32, 1e-5), "bf16": (torch.bfloat16, 3e-2)}


def random_model(rope, theta, seed=0):
    cfg = ApertusConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096,
                        rope_theta=theta, rope_scaling=rope)
    model = build_model(cfg, seed=seed)
    with torch.no_grad():  # away from init, so every block and the RoPE of every position shows in the logits
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return model


def expected_rope(rope, theta):
    return dict(rope or {"rope_type": "default"}, rope_theta=theta)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_through_transformers(variant, dtype, tmp_path):
    rope, theta = VARIANTS[variant]
    torch_dtype, tol = DTYPES[dtype]
    ours = random_model(rope, theta).to(torch_dtype).eval()
    save_model(ours, tmp_path / "ours", dtype=torch_dtype)

    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["rope_parameters"] == expected_rope(rope, theta)  # 5.x spelling, "default" named
    assert config["rope_scaling"] == expected_rope(rope, theta)  # 4.56+ spelling (read first by 5.x)
    assert config["rope_theta"] == theta

    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch_dtype).eval()
    assert ref.config.rope_parameters == expected_rope(rope, theta)
    ids = torch.randint(0, 300, (2, 200), generator=torch.Generator().manual_seed(1))  # past 32 positions
    with torch.no_grad():
        mine, theirs = ours(ids).float(), ref(ids).logits.float()
    assert (mine - theirs).abs().max() <= tol * max(1.0, theirs.abs().max().item())

    ref.save_pretrained(tmp_path / "hf")  # transformers' own config.json spelling
    back = load_model(tmp_path / "hf", dtype=torch_dtype)
    assert back.config == ours.config
    for (k, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    with torch.no_grad():
        again = back(ids).float()
    assert (again - theirs).abs().max() <= tol * max(1.0, theirs.abs().max().item())


def test_the_bug_report_case_is_caught_by_the_comparison(tmp_path):
    """The comparison above can fail: dropping the RoPE keys, as before, loads a different model in transformers."""
    ours = random_model(None, 10_000.0).eval()
    save_model(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_scaling"], config["rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("spelling", ["4.x", "5.x", "both"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_either_spelling_loads(variant, spelling, tmp_path):
    rope, theta = VARIANTS[variant]
    d = random_model(rope, theta).config.to_hf_dict()
    if spelling == "4.x":  # rope_theta beside rope_scaling, which is null for plain RoPE (4.56 writes that)
        del d["rope_parameters"]
        d["rope_scaling"] = None if rope is None else dict(rope)
    elif spelling == "5.x":  # everything inside rope_parameters
        del d["rope_scaling"], d["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = load_config(tmp_path)
    assert (cfg.rope_theta, cfg.rope_scaling) == (theta, rope)


def test_disagreeing_spellings_are_refused(tmp_path):
    d = ApertusConfig(vocab_size=300, hidden_size=64, num_attention_heads=4, num_key_value_heads=1).to_hf_dict()
    d["rope_scaling"] = {"rope_type": "default", "rope_theta": 10_000.0}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="rope_parameters .* and rope_scaling .* disagree"):
        load_config(tmp_path)


@pytest.fixture(scope="module")
def small_tokenizer_json(apertus_tokenizer_json):
    """A 280-token tokenizer with the Apertus pre-tokenizer (the export checks it), small enough to read fast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = Tokenizer.from_file(str(apertus_tokenizer_json)).pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Hello world, grüezi mitenand."] * 10, trainer)
    return tok.to_str()


@pytest.mark.parametrize("variant", VARIANTS)
def test_gguf_writes_the_rope_llama_cpp_reads(variant, small_tokenizer_json, tmp_path):
    """llama.cpp's `apertus` reads rope.freq_base, the rope.scaling.* keys (absent: no scaling) and, for llama3,
    the `rope_freqs` tensor of per-frequency divisors, as llama.cpp's converter writes them."""
    rope, theta = VARIANTS[variant]
    save_model(random_model(rope, theta), tmp_path / "ck", extra_files={"tokenizer.json": small_tokenizer_json})
    reader = gguf.GGUFReader(export_gguf(tmp_path / "ck", tmp_path / "m.gguf"))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["apertus.rope.freq_base"] == theta
    assert meta["apertus.rope.dimension_count"] == 16
    # No scaling type/factor keys: llama.cpp would read a factor as linear scaling on top of rope_freqs.
    assert not [k for k in meta if k.startswith("apertus.rope.scaling")]
    tensors = {t.name: t for t in reader.tensors}
    if rope is None:
        assert "rope_freqs.weight" not in tensors
        return
    hf = transformers.AutoConfig.from_pretrained(tmp_path / "ck")
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    base = 1.0 / (theta ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    factors = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data))
    torch.testing.assert_close(base / factors, inv_freq.float(), rtol=1e-6, atol=0)
    assert len(set(factors.tolist())) > 2  # kept, blended and scaled frequencies all occur
