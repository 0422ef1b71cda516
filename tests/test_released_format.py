"""The released checkpoints' format: a scaled-down checkpoint laid out as `swiss-ai/Apertus-8B-Instruct-2509` is.

The folder has the released config.json (tests/fixtures, every key and value kept but the sizes), the weights in
bf16 split over several shards with model.safetensors.index.json, generation_config.json, and the real tokenizer
files with the chat template. Its weights are scripted (tests/server_helpers.py): the greedy reply to any chat is
REPLY, so loading, chatting and serving can be checked to the token. transformers loads the same folder as the
reference we did not write; the hub-id paths read it from an on-disk hub cache under the released id.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import transformers
from hub_helpers import add_to_hub_cache, offline_env
from safetensors.torch import save_file
from server_helpers import REPLY, chains

from apertus import load_model
from apertus.chat import encode_chat, official_template
from apertus.config import ApertusConfig
from apertus.infer import Engine, SamplingParams
from apertus.model import build_model
from apertus.tokenizer import apertus_tokenizer_path

FIXTURES = Path(__file__).parent / "fixtures"
REAL_CONFIG = json.loads((FIXTURES / "Apertus-8B-2509.config.json").read_text())
RELEASED = "swiss-ai/Apertus-8B-Instruct-2509"
SIZES = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}
# The instruct generation config: stop on </s>, <|assistant_end|>, <|tools_suffix|>; the model card's sampling.
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": [2, 68, 72], "pad_token_id": 3, "do_sample": True,
                     "temperature": 0.8, "top_p": 0.9}
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "<|assistant_end|>", "pad_token": "<pad>", "unk_token": "<unk>"}
MESSAGES = [{"role": "system", "content": "You are a test."}, {"role": "user", "content": "Grüezi! Wie gaht's?"}]


def write_released_layout(path: Path, n_shards: int = 3) -> Path:
    """The scripted model written file by file as the released folder is (not through our save_model)."""
    config = {**REAL_CONFIG, **SIZES}
    model = build_model(ApertusConfig.from_hf_dict(config), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # residual stream = the token's embedding; lm_head rows hold each token's successor
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        for chain in chains("chat"):
            for a, b in zip(chain[:-1], chain[1:], strict=True):
                u = torch.randn(SIZES["hidden_size"], generator=g)
                model.model.embed_tokens.weight[a] = u / u.norm()
                model.lm_head.weight[b] += 50 * u / u.norm()
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    path.mkdir(parents=True)
    names = list(state)
    weight_map = {}
    for i in range(n_shards):  # contiguous runs of tensors, as the released shards are
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: state[k] for k in names[i * len(names) // n_shards:(i + 1) * len(names) // n_shards]}
        save_file(part, path / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(v.numel() * v.element_size() for v in state.values())
    files = {"config.json": config, "generation_config.json": GENERATION_CONFIG,
             "model.safetensors.index.json": {"metadata": {"total_size": total}, "weight_map": weight_map},
             "special_tokens_map.json": SPECIAL_TOKENS_MAP,
             "tokenizer_config.json": {**json.loads((FIXTURES / "Apertus-Instruct-2509.tokenizer_config.json")
                                                    .read_text()), "chat_template": official_template()}}
    for name, obj in files.items():
        (path / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    (path / "tokenizer.json").write_bytes(apertus_tokenizer_path().read_bytes())
    (path / "chat_template.jinja").write_text(official_template())
    return path


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return write_released_layout(tmp_path_factory.mktemp("released") / "Apertus-8B-Instruct-2509")


@pytest.fixture(scope="module")
def hub_cache(released, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    add_to_hub_cache(cache, RELEASED, released)
    return cache


def test_the_folder_is_laid_out_as_released(released):
    config = json.loads((released / "config.json").read_text())
    assert set(config) == set(REAL_CONFIG)
    assert {k: v for k, v in config.items() if k not in SIZES} == {k: v for k, v in REAL_CONFIG.items()
                                                                    if k not in SIZES}
    shards = sorted(p.name for p in released.glob("*.safetensors"))
    assert len(shards) == 3 and "model.safetensors" not in shards
    index = json.loads((released / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards


def test_transformers_loads_it_and_agrees_with_ours(released):
    ours = load_model(released, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(released, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(released)
    ids = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    with Engine(released, device="cpu", cache_gb=0.05) as engine:
        assert encode_chat(engine.tokenizer, MESSAGES, add_generation_prompt=True)[0] == ids
        [r] = engine.generate([ids], SamplingParams(temperature=0, max_tokens=40))
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-4, rtol=1e-4)
        # transformers stops on the released generation_config's eos list, as our engine does
        hf_out = theirs.generate(x, do_sample=False, max_new_tokens=40)[0, len(ids):].tolist()
    assert r.output_ids == hf_out and r.output_ids[-1] == 68
    assert r.text == REPLY and r.finish_reason == "stop"


def test_apertus_chat_by_the_released_hub_id(hub_cache, tmp_path):
    r = subprocess.run([sys.executable, "-m", "apertus.cli", "chat", RELEASED, "--temperature", "0", "--device",
                        "cpu", "--cache-gb", "0.05"], input="Grüezi!\n/quit\n", capture_output=True, text=True,
                       env=offline_env(hub_cache), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert REPLY in r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_apertus_serve_by_the_released_hub_id_answers_the_openai_client(hub_cache, tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "apertus.cli", "serve", RELEASED, "--port", str(port), "--device",
                             "cpu", "--cache-gb", "0.05", "--log-level", "warning"], env=offline_env(hub_cache),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        [model] = client.models.list().data
        assert model.id == "Apertus-8B-Instruct-2509"
        reply = client.chat.completions.create(model=model.id, messages=MESSAGES, temperature=0)
        assert reply.choices[0].message.content == REPLY and reply.choices[0].finish_reason == "stop"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# --- apertus info on the real configuration ---------------------------------------------------------------------------


def count_params(c: dict) -> int:
    """Parameters of an Apertus config, by the architecture's formula (docs/recipe.md §1.1): untied input and output
    embeddings; per layer Q, K, V, O projections without biases, QK-norm weights (head_dim each), the non-gated
    xIELU MLP (up, down) with its two trainable scalars, and two RMSNorms; the final RMSNorm."""
    h, v, n_layers = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    d = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    attention = h * q + 2 * h * kv + q * h + 2 * d
    mlp = 2 * h * c["intermediate_size"] + 2
    return 2 * v * h + n_layers * (attention + mlp + 2 * h) + h


def _info(capsys, spec) -> tuple[int, str]:
    from apertus.cli import main

    assert main(["info", spec]) == 0
    out = capsys.readouterr().out
    return int(re.search(r"\(([\d,]+);", out).group(1).replace(",", "")), out


def test_info_on_the_released_config_prints_the_8b_figures(capsys):
    expected = count_params(REAL_CONFIG)
    assert 8.0e9 < expected < 8.1e9  # "8.05 B" of the model card
    n, out = _info(capsys, str(FIXTURES / "Apertus-8B-2509.config.json"))
    assert n == expected and "8.05B parameters" in out
    assert "layers 32, hidden 4096, heads 32/8 x 128, MLP 21504" in out and "llama3 x8" in out and "65,536" in out


def test_info_on_the_70b_prints_the_70b_figures(capsys):
    c70 = {**REAL_CONFIG, "hidden_size": 8192, "intermediate_size": 43008, "num_hidden_layers": 80,
           "num_attention_heads": 64, "num_key_value_heads": 8}
    expected = count_params(c70)
    assert 70.5e9 < expected < 70.7e9  # "70.6B params" of the model page
    n, out = _info(capsys, "apertus-70b")
    assert n == expected and "70.6" in out


def test_info_by_hub_id(hub_cache, tmp_path):
    r = subprocess.run([sys.executable, "-m", "apertus.cli", "info", RELEASED], capture_output=True, text=True,
                       env=offline_env(hub_cache), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{count_params({**REAL_CONFIG, **SIZES}):,}" in r.stdout
