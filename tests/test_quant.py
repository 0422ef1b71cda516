"""Weight-only int8 and int4 (apertus.infer.quant): the int4 layer against its own dequantized weights, and both modes
against fp32 on a small model trained on real text (next-token agreement, KL, loss), through the model and the engine.

The bits-per-byte figures on FLORES for the speedrun's trained model are the benchmark's (bench/), not these tests'.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from apertus import ApertusConfig, build_model, save_model
from apertus.infer import Engine, SamplingParams
from apertus.infer.quant import Int4Linear, Int8Linear, cache_file, quantize_int4, quantize_weights

SEQ = 128


def int4_dequantized(layer: Int4Linear, k: int) -> torch.Tensor:
    """The weight the kernel multiplies by: its product with the identity (exact in bf16), as [out, in]."""
    return layer(torch.eye(k, dtype=torch.bfloat16)).T.double()


def test_int8_linear_quantizes_each_row_of_activations_and_sums_exactly():
    """W8A8 (where the CPU has int8 dot products): every input row gets its own int8 step and the int8 products are
    summed exactly, so a row's output is the same alone or in a batch, and equals the product of the dequantized
    values; the weight-only path (bf16 activations) stays close to it."""
    g = torch.Generator().manual_seed(0)
    n, k = 96, 256
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
    x = torch.randn(5, k, generator=g) * torch.tensor([1.0, 30.0, 0.01, 3.0, 300.0])[:, None]
    layer = Int8Linear(linear, int8_activations=True)
    y = layer(x)
    assert y.shape == (5, n) and y.dtype == torch.float32
    for i in range(5):
        assert torch.equal(layer(x[i:i + 1]), y[i:i + 1])
    step = x.double().abs().amax(-1, keepdim=True) / 127
    xq = (x.double() / step).round()
    assert xq.abs().max() == 127 and len(xq.unique()) > 100
    wq = layer.weight.double() * layer.scale.double()[:, None]
    ref = (xq * step) @ wq.T
    assert ((y.double() - ref).abs() <= 1e-5 * ref.abs().amax(-1, keepdim=True)).all()
    exact = x.double() @ linear.weight.detach().double().T
    err = (y.double() - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert (err < 0.02).all() and (err > 1e-4).all()  # quantized, not the float product
    weight_only = Int8Linear(linear, int8_activations=False)(x).double()
    assert ((weight_only - exact).norm(dim=-1) / exact.norm(dim=-1) < 0.02).all()
    assert not torch.equal(weight_only, y.double())


def test_int4_linear_is_a_16_level_grid_per_group_and_matmuls_with_it():
    g = torch.Generator().manual_seed(0)
    n, k, group = 100, 256, 32  # 100 rows: the kernel packs multiples of 16, the layer pads and cuts
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        linear.weight[3, 40] = 1.5  # an outlier costs its own group only
    before = linear.weight.detach().clone()
    layer = Int4Linear(linear, group)
    assert torch.equal(linear.weight, before)  # quantizing works on a copy
    w = linear.weight.detach().double()
    deq = int4_dequantized(layer, k)
    assert deq.shape == (n, k)
    groups, dq = w.reshape(n, k // group, group), deq.reshape(n, k // group, group)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    # round to nearest on an evenly spaced 16-level grid from min to max: within half a step (+ bf16 rounding)
    err = (dq - groups).abs()
    assert (err <= 0.5 * step[..., None] * 1.02 + groups.abs() * 2**-8).all()
    assert max(len(set(row.tolist())) for row in dq.reshape(-1, group)) <= 16
    assert err[3, 1].max() > 0.02 and err[3, 2].max() < 0.015  # the outlier's group is coarse, the others are not
    x = torch.randn(2, 5, k, generator=g)
    y = layer(x)
    assert y.shape == (2, 5, n) and y.dtype == torch.float32
    ref = x.to(torch.bfloat16).double() @ deq.T  # activations go through the kernel in bf16
    assert (y.double() - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert (y.double() - x.double() @ w.T).abs().max() > 1e-3  # not simply the float weights
    half = Int4Linear(copy.deepcopy(linear).to(torch.bfloat16), group)  # a bf16 model (the released checkpoints)
    y16, deq16 = half(x.to(torch.bfloat16)), int4_dequantized(half, k)
    assert y16.dtype == torch.bfloat16 and (deq16 - w).abs().max() <= 0.06  # half a step of the outlier's group
    ref16 = x.to(torch.bfloat16).double() @ deq16.T
    assert (y16.double() - ref16).abs().max() <= 1e-2 * ref16.abs().max()
    with pytest.raises(ValueError, match="in_features 96 is not a multiple of the group size 64"):
        Int4Linear(nn.Linear(96, 32, bias=False), 64)


def test_a_model_int4_cannot_take_is_left_as_it_was():
    cfg = ApertusConfig(vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = build_model(cfg)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj has in_features 112, not a multiple of the "
                                         r"group size 32; use int8"):
        Engine(model, quantize="int4", cache_gb=0.01)
    assert not any(isinstance(m, Int4Linear) for m in model.modules())
    with pytest.raises(ValueError, match="int8 or int4 on CPU only"):
        Engine(model, quantize="int3", cache_gb=0.01)
    assert isinstance(quantize_weights(model, "int8").lm_head, Int8Linear)  # int8 has no such limit


QUANTIZE_CHILD = """
import sys, torch, apertus
from apertus.infer.quant import quantize_weights
def kb(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
model = apertus.load_model(sys.argv[1], dtype=torch.bfloat16, mmap=False)  # the float weights in private memory
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
before = kb("VmRSS")
quantize_weights(model, sys.argv[2])
print((kb("VmHWM") - before) * 1024, (kb("VmRSS") - before) * 1024)
"""


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizing_frees_each_float_layer_as_it_goes(tmp_path, mode):
    """The float model and the quantized one are never in memory together (for the 8B in int8 that would be 24 GB):
    quantizing grows the memory by at most one layer's working copy, and gives back the float weights' bytes."""
    cfg = ApertusConfig(vocab_size=2048, hidden_size=1024, intermediate_size=2048, num_hidden_layers=16,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=128)
    save_model(build_model(cfg, dtype=torch.bfloat16), tmp_path / "m")
    sizes = [m.weight.numel() for m in build_model(cfg, device="meta").modules() if isinstance(m, nn.Linear)]
    # one layer's working copies (fp32 weights, int32 levels for int4, the result) with the allocator's rounding:
    # 9-15 bytes a weight of the largest layer were seen
    linear, working = sum(sizes), 20 * max(sizes)
    assert working < 0.5 * linear  # so the bound below tells one layer from all of them
    # glibc's adaptive threshold (and `import apertus`'s setting) would keep freed blocks in the heap: a fixed one gives
    # them back, so the memory seen is the memory held
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", APERTUS_KEEP_FREED_MEMORY="0")
    out = subprocess.run([sys.executable, "-c", QUANTIZE_CHILD, str(tmp_path / "m"), mode], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    peak, after = map(int, out.stdout.split())
    assert peak <= working  # not the whole quantized model on top of the float one
    assert after <= -0.5 * linear  # 2 bytes a weight given back, 1 (int8) or ~0.6 (int4) kept


@pytest.fixture(scope="module")
def trained(data_dir):
    """A byte-level Apertus (2 layers, 128 wide) trained on tinyshakespeare for a few hundred steps, and held-out
    text: weights and activations shaped by training (outlier channels, peaked predictions), unlike random ones."""
    text = (data_dir / "tinyshakespeare" / "input.txt").read_bytes()
    data = torch.tensor(list(text[:1_000_000]))
    held_out = torch.tensor(list(text[1_000_000:1_000_000 + 8 * SEQ])).view(8, SEQ)
    cfg = ApertusConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024)
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g, steps = torch.Generator().manual_seed(0), 160
    for step in range(steps):
        starts = torch.randint(0, len(data) - SEQ - 1, (8,), generator=g)
        batch = torch.stack([data[s:s + SEQ + 1] for s in starts])
        for group in opt.param_groups:  # linear decay over the last third
            group["lr"] = 3e-3 * min(1.0, 3 * (steps - step) / steps)
        loss = nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), held_out


def log_probs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(ids).float(), -1)


@pytest.mark.parametrize("mode, max_kl, min_agree", [("int8", 5e-4, 0.98), ("int4", 5e-3, 0.95)])
def test_quantized_predictions_stay_close_to_fp32(trained, mode, max_kl, min_agree):
    model, ids = trained
    ref = log_probs(model, ids)
    loss = -ref[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    assert loss < 2.8  # trained: uniform over bytes is 5.5 nats, unigram ~3.3
    lp = log_probs(quantize_weights(copy.deepcopy(model), mode), ids)
    kl = (ref.exp() * (ref - lp)).sum(-1).mean()
    agree = (lp.argmax(-1) == ref.argmax(-1)).float().mean()
    q_loss = -lp[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    print(f"{mode}: KL {kl:.2e}, next-token agreement {agree:.4f}, loss {loss:.4f} -> {q_loss:.4f}")
    assert 0 < kl <= max_kl and agree >= min_agree
    assert abs(q_loss - loss) <= 10 * max_kl


def test_int4_groups_trade_quality_for_bytes(trained):
    """Smaller groups fit the weights better: KL to fp32 of groups of 32 below that of one group per row (128)."""
    model, ids = trained
    ref = log_probs(model, ids)
    kl = {}
    for group in (32, 128):
        lp = log_probs(quantize_int4(copy.deepcopy(model), group), ids)
        kl[group] = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    assert kl[32] < kl[128]


def test_engine_int4_decodes_what_fp32_predicts(trained, tmp_path):
    model, ids = trained
    save_model(model, tmp_path / "ck")
    prompts = [ids[0, :40].tolist(), ids[1, :7].tolist()]
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=True, ignore_eos=True)
    with Engine(tmp_path / "ck", quantize="int4", cache_gb=0.01) as engine:
        assert isinstance(engine.model.lm_head, Int4Linear)
        outs = engine.generate(prompts, params)
    for p, out in zip(prompts, outs, strict=True):  # teacher-forced: fp32's log-probs of the engine's tokens
        lp = log_probs(model, torch.tensor([p + out.output_ids]))[0, len(p) - 1:-1]
        chosen = lp.gather(1, torch.tensor(out.output_ids)[:, None]).squeeze(1)
        assert (torch.tensor(out.logprobs) - chosen).abs().max() <= 0.25
        assert (lp.max(-1).values - chosen).max() <= 0.25  # greedy up to int4 noise


def mapped_files() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split(maxsplit=5)[5].strip() for line in f if len(line.split(maxsplit=5)) == 6}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_second_start_maps_the_quantized_layers_the_first_one_kept(trained, tmp_path, monkeypatch, mode):
    model, ids = trained
    monkeypatch.setenv("APERTUS_QUANT_CACHE", str(tmp_path / "cache"))
    save_model(model, tmp_path / "ck", dtype=torch.bfloat16)
    prompts = [ids[0, :20].tolist()]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=True, ignore_eos=True)

    def start():
        with Engine(tmp_path / "ck", quantize=mode, cache_gb=0.01) as engine:
            (out,) = engine.generate(prompts, params)
            return engine.start_info, out.logprobs, mapped_files()

    cached = cache_file(tmp_path / "ck", mode, torch.bfloat16)
    assert cached.parent == tmp_path / "cache" and not cached.exists()
    (first,), logprobs, _ = start()
    assert first.startswith(f"quantized to {mode}") and "kept in" in first and cached.is_file()
    (second,), again, maps = start()
    assert second.startswith(f"{mode} weights mapped from") and str(cached) in maps
    assert again == logprobs  # the very same layers

    cached.write_bytes(cached.read_bytes()[:1000])  # a damaged file is quantized anew and replaced
    (third,), again, _ = start()
    assert third.startswith(f"quantized to {mode}") and again == logprobs
    assert start()[0][0].startswith(f"{mode} weights mapped from")

    save_model(model.half().float(), tmp_path / "ck", dtype=torch.bfloat16)  # a new checkpoint: another file
    assert cache_file(tmp_path / "ck", mode, torch.bfloat16) != cached
    assert start()[0][0].startswith(f"quantized to {mode}")

    monkeypatch.setenv("APERTUS_QUANT_CACHE", "off")
    assert cache_file(tmp_path / "ck", mode, torch.bfloat16) is None and start()[0] == []
