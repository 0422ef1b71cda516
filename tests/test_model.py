"""The model against transformers' ApertusForCausalLM (the reference we did not write), both directions."""

import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from apertus import ApertusConfig, build_model, load_model, preset, save_model
from apertus.model import Linear, causal_attention, document_mask, packed_position_ids, single_query_attention

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

# (GQA ratio 1, 2, 4; default and llama3 RoPE; head_dim != hidden/heads; 1-3 layers)
CONFIGS = [
    dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16, num_hidden_layers=1, rope=None),
    dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_hidden_layers=2, rope=LLAMA3),
    dict(hidden_size=96, num_attention_heads=8, num_key_value_heads=2, head_dim=8, num_hidden_layers=3, rope=LLAMA3),
    dict(hidden_size=48, num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_hidden_layers=2, rope=None),
    dict(hidden_size=80, num_attention_heads=4, num_key_value_heads=1, head_dim=20, num_hidden_layers=3, rope=LLAMA3),
]


def hf_model(spec, seed=0):
    spec = dict(spec)
    rope = spec.pop("rope")
    rope_parameters = dict(rope or {"rope_type": "default"}, rope_theta=10000.0)
    cfg = transformers.ApertusConfig(vocab_size=257, intermediate_size=112, max_position_embeddings=4096,
                                     rope_parameters=rope_parameters, **spec)
    torch.manual_seed(seed)
    model = transformers.ApertusForCausalLM(cfg).eval()
    with torch.no_grad():  # random weights well away from init, xIELU alphas included
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("spec", CONFIGS)
def test_logits_match_transformers_fp32_and_bf16(spec, tmp_path):
    ref = hf_model(spec)
    ref.save_pretrained(tmp_path)
    ids = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))
    ours = load_model(tmp_path)
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() <= 1e-5
    ours16 = load_model(tmp_path, dtype=torch.bfloat16)
    ref16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        a, b = ours16(ids).float(), ref16(ids).logits.float()
    assert (a - b).abs().max() <= 2e-2 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("spec", CONFIGS[1:3])
def test_our_checkpoint_loads_in_transformers(spec, tmp_path):
    spec = dict(spec)
    rope = spec.pop("rope")
    cfg = ApertusConfig(vocab_size=257, intermediate_size=112, max_position_embeddings=4096, rope_theta=10000.0,
                        rope_scaling=rope, **spec)
    ours = build_model(cfg, seed=3)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_model(ours, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 257, (3, 33))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() <= 1e-5


def test_set_rope_changes_theta_and_scaling_as_transformers_computes_them(tmp_path):
    hf_model(CONFIGS[1]).save_pretrained(tmp_path)  # llama3 scaling, theta 10,000
    ours = load_model(tmp_path)
    ids = torch.randint(0, 257, (2, 90), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours(ids)  # the frequencies are cached now: set_rope must replace them
        for theta, scaling, rope_parameters in [
            (20_000.0, ..., dict(LLAMA3, rope_theta=20_000.0)),  # scaling left out: it stays
            (500_000.0, None, {"rope_type": "default", "rope_theta": 500_000.0}),  # None: plain RoPE
        ]:
            ours.set_rope(theta) if scaling is ... else ours.set_rope(theta, scaling)
            ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, rope_parameters=rope_parameters).eval()
            assert ours.config.rope_theta == theta
            assert (ours(ids) - ref(ids).logits).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="theta must be positive"):
        ours.set_rope(0)


def test_sharded_checkpoint_round_trip(tmp_path):
    model = build_model(preset("tiny"), seed=1)
    save_model(model, tmp_path / "ck", max_shard_bytes=2_000_000, dtype="bf16")
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 3
    again = load_model(tmp_path / "ck", dtype=torch.bfloat16)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), k
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.bfloat16)
    ids = torch.randint(0, 8192, (1, 20))
    with torch.no_grad():
        assert (again(ids).float() - ref(ids).logits.float()).abs().max() <= 2e-2


def test_packed_documents_equal_separate_runs():
    model = build_model(ApertusConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2), seed=0)
    a, b = torch.randint(0, 101, (1, 13)), torch.randint(0, 101, (1, 19))
    packed = torch.cat([a, b], dim=1)
    starts = torch.zeros_like(packed, dtype=torch.bool)
    starts[0, [0, 13]] = True
    pos = packed_position_ids(starts)
    assert pos[0, :13].tolist() == list(range(13)) and pos[0, 13:].tolist() == list(range(19))
    with torch.no_grad():
        out = model(packed, position_ids=pos, attn_mask=document_mask(pos))
        torch.testing.assert_close(out[:, :13], model(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, 13:], model(b), atol=1e-5, rtol=0)


def test_packed_documents_match_transformers(tmp_path):
    ref = hf_model(CONFIGS[1])
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, 257, (1, 30))
    pos = torch.tensor([list(range(10)) + list(range(20))])
    with torch.no_grad():  # without a cache transformers detects packed rows from restarting positions
        ref_logits = ref(ids, position_ids=pos, use_cache=False).logits
        torch.testing.assert_close(ours(ids, pos, document_mask(pos)), ref_logits, atol=1e-5, rtol=0)


class ListCache:
    """The minimal KV-cache protocol: keep appending keys/values per layer."""

    def __init__(self):
        self.kv = {}

    def update(self, layer, k, v):
        if layer in self.kv:
            k, v = torch.cat([self.kv[layer][0], k], 2), torch.cat([self.kv[layer][1], v], 2)
        self.kv[layer] = (k, v)
        return k, v


def test_kv_cache_hook_gives_full_forward_logits():
    model = build_model(preset("tiny"), seed=0)
    ids = torch.randint(0, 8192, (2, 24))
    with torch.no_grad():
        full = model(ids)
        cache = ListCache()
        parts = [model(ids[:, :10], torch.arange(10)[None], cache=cache)]
        parts.append(model(ids[:, 10:17], torch.arange(10, 17)[None], cache=cache))  # chunk: bottom-right causal
        for t in range(17, 24):
            parts.append(model(ids[:, t:t + 1], torch.tensor([[t]]), cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_meta_build_of_real_shapes_and_info():
    from apertus.cli import main

    for name, billions in (("apertus-8b", 8.05), ("apertus-70b", 70.6)):
        model = build_model(preset(name), device="meta")
        assert abs(model.num_params() / 1e9 - billions) / billions < 0.005
        assert model.num_params() == model.config.num_params()
    # The tech report's FLOP figures (App. D): 51.6 and 449.6 GFLOP per trained token at seq 4096.
    assert abs(preset("apertus-8b").flops_per_token(4096) / 51.6e9 - 1) < 0.005
    assert abs(preset("apertus-70b").flops_per_token(4096) / 449.6e9 - 1) < 0.005
    out = subprocess.run([sys.executable, "-m", "apertus.cli", "info", "apertus-8b"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "8.05B" in out.stdout and "GFLOP" in out.stdout
    assert main(["info", "apertus-70b"]) == 0


def test_init_statistics():
    cfg = preset("tiny")
    model = build_model(cfg, seed=0)
    std = cfg.initializer_range
    assert abs(model.model.layers[0].mlp.up_proj.weight.std().item() / std - 1) < 0.02
    out = model.model.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(out / (std / (2 * cfg.num_hidden_layers) ** 0.5) - 1) < 0.02
    act = model.model.layers[0].mlp.act_fn
    assert torch.nn.functional.softplus(act.alpha_p).item() == pytest.approx(0.8, rel=1e-6)
    assert (act.beta + torch.nn.functional.softplus(act.alpha_n)).item() == pytest.approx(0.8, rel=1e-6)
    assert torch.equal(build_model(cfg, seed=0).lm_head.weight, model.lm_head.weight)


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config.json: model_type is 'llama'"):
        load_model(tmp_path)
    model = build_model(ApertusConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1))
    save_model(model, tmp_path / "m")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(49, 32)
    save_file(state, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.layers.0.mlp.up_proj.weight has shape"):
        load_model(tmp_path / "m")
    del state["model.layers.0.mlp.up_proj.weight"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing model.layers.0.mlp.up_proj.weight; unexpected extra.weight"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_model(tmp_path / "m")


def test_bf16_load_is_memory_frugal(tmp_path):
    """A bf16 checkpoint loads within ~1.2x its size of extra RAM (peak RSS of a fresh process)."""
    cfg = ApertusConfig(vocab_size=32768, hidden_size=1024, intermediate_size=5376, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=2)
    save_model(build_model(cfg, dtype=torch.bfloat16), tmp_path, max_shard_bytes=200 * 2**20)
    size = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    code = (f"import resource, torch, apertus; r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            f"m = apertus.load_model({str(tmp_path)!r}, dtype=torch.bfloat16); "
            f"print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) <= 1.2 * size


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_single_query_attention_equals_sdpa_with_gqa_and_masks(dtype, tol):
    g = torch.Generator().manual_seed(0)
    B, H, n_kv, L, D = 3, 8, 2, 37, 16
    q, k, v = (torch.randn(*s, generator=g).to(dtype) for s in ((B, H, 1, D), (B, n_kv, L, D), (B, n_kv, L, D)))
    allowed = torch.arange(L)[None] < torch.tensor([37, 20, 5])[:, None]  # rows of different lengths
    additive = torch.zeros(B, L, dtype=dtype).masked_fill(~allowed, -torch.inf)
    for mask in (None, allowed[:, None, None], additive[:, None, None]):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out = single_query_attention(q, k, v, mask)
        assert out.shape == (B, 1, H * D)
        assert (out.float() - ref.transpose(1, 2).reshape(B, 1, H * D).float()).abs().max() <= tol


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_causal_attention_equals_sdpa_with_gqa_and_document_masks(dtype, tol):
    """The blocked matmul attention (CPU training under compile) against SDPA: outputs and the gradients of q, k, v,
    plain causal and with packed documents, T not a multiple of the block."""
    g = torch.Generator().manual_seed(0)
    B, H, n_kv, T, D = 2, 6, 2, 45, 16
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[:, 0], starts[0, 17], starts[1, 30] = True, True, True
    doc = document_mask(packed_position_ids(starts))[:, None]
    for mask in (None, doc):
        qkv = [torch.randn(*s, generator=g).to(dtype).requires_grad_() for s in ((B, H, T, D), (B, n_kv, T, D),
                                                                                  (B, n_kv, T, D))]
        dy = torch.randn(B, H, T, D, generator=g).to(dtype)
        ref = F.scaled_dot_product_attention(*qkv, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        ref_grads = torch.autograd.grad(ref, qkv, dy)
        out = causal_attention(*qkv, attn_mask=mask, block=16)
        for a, b in zip((out, *torch.autograd.grad(out, qkv, dy)), (ref, *ref_grads), strict=True):
            assert a.shape == b.shape and a.dtype == dtype
            assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()


def test_compiled_training_forward_and_backward_equal_eager_with_packed_documents():
    """Under torch.compile on CPU attention takes the blocked matmul path (causal_attention); logits and gradients
    equal the eager model's (SDPA) for packed documents."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = build_model(ApertusConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2), seed=0)
    ids = torch.randint(0, 101, (2, 150), generator=torch.Generator().manual_seed(0))
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 0], starts[0, 40], starts[1, 129] = True, True, True
    pos = packed_position_ids(starts)

    def step(run):
        model.zero_grad()
        logits = run(ids, pos, document_mask(pos))
        logits.square().mean().backward()
        return [logits.detach()] + [p.grad.clone() for p in model.parameters()]

    eager = step(model)
    compiled, code = run_and_get_code(step, torch.compile(model, dynamic=False))
    assert "scaled_dot_product" not in "".join(code) and "extern_kernels" in "".join(code)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_compiled_one_row_linear_is_a_weight_bound_loop_equal_to_the_gemm(dtype, tol):
    """Decoding one row under torch.compile on CPU, model.Linear is inductor's own multiply-and-sum loop (no call to
    a GEMM library), split in pieces when the sum is longer than 4,096; several rows stay one GEMM."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    for k in (96, 5000):  # 5,000 = 2 pieces of 2,500
        layer = Linear(k, 40, bias=False).to(dtype)
        layer.weight.data = torch.randn(40, k, generator=g).to(dtype) / k**0.5
        for rows in ((1, 1, k), (3, k)):
            x = torch.randn(*rows, generator=g).to(dtype)
            out, code = run_and_get_code(torch.compile(layer, dynamic=False), x)
            gemm = re.search(r"extern_kernels\.\w+\(|torch\.ops\.mkldnn\.", "".join(code)) is not None
            assert gemm == (x.numel() > k), (rows, k)
            ref = F.linear(x.double(), layer.weight.double())
            assert out.shape == ref.shape and out.dtype == dtype
            assert (out.double() - ref).abs().max() <= tol * ref.abs().max()


MMAP_CHILD = """
import json, sys, torch, apertus
def status():  # kB: anonymous (private copies) and file-backed (mapped files, shared with the page cache) resident
    return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":") for line in open("/proc/self/status"))
            if k in ("RssAnon", "RssFile", "VmRSS", "VmHWM")}
apertus.load_model(sys.argv[1], dtype=torch.bfloat16)  # first use: library code paged in is not the weights
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
before = status()
model = apertus.load_model(sys.argv[2], dtype=torch.bfloat16)
after = status()
copy = apertus.load_model(sys.argv[2], dtype=torch.bfloat16, mmap=False)  # the control: a copy is anonymous memory
print(json.dumps({"anon": after["RssAnon"] - before["RssAnon"], "peak": after["VmHWM"] - before["VmRSS"],
                  "copy_anon": status()["RssAnon"] - after["RssAnon"]}))
"""


def test_same_dtype_load_maps_the_file(tmp_path):
    """Weights stored in the dtype asked for are the memory-mapped file, not a copy: loading a ~40 MB bf16 checkpoint
    (in shards) in a fresh process adds almost no anonymous memory (a copy would add the file's size), its peak RSS
    grows by about the file's size (mmap=False: a copy, as quantizing callers ask), and writing to the loaded weights
    leaves the file as it was (copy-on-write)."""
    cfg = ApertusConfig(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2)
    save_model(build_model(cfg, dtype=torch.bfloat16), tmp_path / "big", max_shard_bytes=24 * 2**20)
    small = ApertusConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1)
    save_model(build_model(small, dtype=torch.bfloat16), tmp_path / "small")
    files = sorted((tmp_path / "big").glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    assert len(files) >= 2 and size > 35e6
    out = subprocess.run([sys.executable, "-c", MMAP_CHILD, str(tmp_path / "small"), str(tmp_path / "big")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grew = json.loads(out.stdout)
    assert grew["anon"] <= 0.2 * size <= 0.8 * size <= grew["copy_anon"], (grew, size)
    assert grew["peak"] <= 1.3 * size, (grew, size)

    model = load_model(tmp_path / "big", dtype=torch.bfloat16)
    stored = {k: v for f in files for k, v in load_file(f).items()}
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert not torch.equal(model.lm_head.weight, stored["lm_head.weight"])
    assert all(torch.equal(v, stored[k]) for f in files for k, v in load_file(f).items())
    fp32 = load_model(tmp_path / "big", dtype=torch.float32)  # converted: a fresh copy, as before
    assert torch.equal(fp32.lm_head.weight, stored["lm_head.weight"].float())
