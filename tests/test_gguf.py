"""GGUF export, read back with gguf-py's GGUFReader and (when installed) run by llama.cpp via llama-cpp-python.

References we did not write: the checkpoint's safetensors and config.json as transformers reads them, transformers'
llama3 RoPE, the HF tokenizer (AutoTokenizer), gguf-py's reader and tensor-name map, and llama.cpp itself.
"""

import json
import os
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from apertus.checkpoint import save_model
from apertus.config import ApertusConfig
from apertus.export_gguf import export_gguf
from apertus.model import build_model

# A small original context so that all three llama3 regimes (kept, blended, scaled) occur at head_dim 16.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
N_LAYERS = 3
PROMPTS = ["Hello world!", "Grüezi mitenand, wie gaht's? \\begin{equation} x^2 \\end{equation} 12345",
           "def f(x):\n    return x * 2  # Ελληνικά 日本語 🚀"]


def random_model(vocab_size: int, seed: int = 0, rope=LLAMA3):
    cfg = ApertusConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=N_LAYERS,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                        rope_theta=10000.0, rope_scaling=rope)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every parameter away from its init: norms, per-layer xIELU alphas included
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 2:
                p.copy_(noise / p.shape[1] ** 0.5 if "embed" not in name else noise)
            else:
                p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.3 * noise)
    return model


def tokenizer_files(tok_dir):
    return {n: (tok_dir / n).read_text() for n in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")}


@pytest.fixture(scope="module")
def ckpt(apertus_tokenizer_json, tmp_path_factory):
    """A random 3-layer model with the real 131,072-token Apertus tokenizer and chat template, saved as fp32."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-apertus"
    files = tokenizer_files(apertus_tokenizer_json.parent)
    save_model(random_model(131072), path, instruct=True, extra_files=files)
    return path


@pytest.fixture(scope="module")
def exported(ckpt):
    return export_gguf(ckpt, ckpt.parent / "out" / "tiny.gguf")


@pytest.fixture(scope="module")
def reader(exported):
    return gguf.GGUFReader(exported)  # ~10 s for 131k tokens and 269k merges: read once


def fields(reader):
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="module")
def small_ckpt(apertus_tokenizer_json, tmp_path_factory):
    """The same kind of model with a 400-token tokenizer (Apertus pre-tokenizer and special layout) and 20 extra
    embedding rows, so the GGUF vocabulary needs padding entries."""
    from tokenizers import Tokenizer

    tok = small_tokenizer(Tokenizer.from_file(str(apertus_tokenizer_json)).pre_tokenizer)
    path = tmp_path_factory.mktemp("gguf-small") / "ck"
    save_model(random_model(tok.get_vocab_size() + 20), path, extra_files={"tokenizer.json": tok.to_str()})
    return path, tok


def test_metadata_is_what_llama_cpp_reads(ckpt, reader):
    meta = fields(reader)
    hf = transformers.AutoConfig.from_pretrained(ckpt)
    state = load_file(ckpt / "model.safetensors")
    arch = "apertus"
    expected = {
        "general.architecture": arch, "general.type": "model", "general.name": "Tiny Apertus",
        "general.file_type": int(gguf.LlamaFileType.ALL_F32), "general.quantization_version": 2,
        "general.sampling.temp": pytest.approx(0.8), "general.sampling.top_p": pytest.approx(0.9),
        f"{arch}.block_count": hf.num_hidden_layers, f"{arch}.context_length": hf.max_position_embeddings,
        f"{arch}.embedding_length": hf.hidden_size, f"{arch}.feed_forward_length": hf.intermediate_size,
        f"{arch}.attention.head_count": hf.num_attention_heads,
        f"{arch}.attention.head_count_kv": hf.num_key_value_heads,
        f"{arch}.rope.freq_base": hf.rope_parameters["rope_theta"],
        f"{arch}.attention.layer_norm_rms_epsilon": pytest.approx(hf.rms_norm_eps),
        f"{arch}.attention.key_length": hf.head_dim, f"{arch}.attention.value_length": hf.head_dim,
        f"{arch}.rope.dimension_count": hf.head_dim, f"{arch}.vocab_size": hf.vocab_size,
    }
    # xIELU: the raw (pre-softplus) parameters of each layer, as stored in the checkpoint
    for leaf in ("alpha_p", "alpha_n", "beta", "eps"):
        values = [state[f"model.layers.{i}.mlp.act_fn.{leaf}"].item() for i in range(N_LAYERS)]
        expected[f"xielu.{leaf}"] = pytest.approx(values, rel=1e-7)
    assert len(set(expected["xielu.alpha_p"].expected)) == N_LAYERS  # per-layer values really differ
    tokenizer_keys = {k for k in meta if k.startswith("tokenizer.")}
    assert set(meta) - tokenizer_keys - {"general.size_label"} == set(expected)
    for key, value in expected.items():
        assert meta[key] == value, key


def test_tensors_equal_the_checkpoint(ckpt, reader):
    tensors = {t.name: t for t in reader.tensors}
    state = load_file(ckpt / "model.safetensors")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.APERTUS, N_LAYERS)
    weights = {k: v for k, v in state.items() if ".act_fn." not in k}  # xIELU scalars are metadata
    assert set(tensors) == {names.get_name(k, try_suffixes=(".weight",)) for k in weights} | {"rope_freqs.weight"}
    for key, value in weights.items():
        t = tensors[names.get_name(key, try_suffixes=(".weight",))]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(reversed(t.shape.tolist())) == list(value.shape)  # ggml lists dimensions innermost first
        np.testing.assert_array_equal(t.data, value.numpy())  # Q/K not permuted: Apertus RoPE is NEOX-style
    # rope_freqs holds per-frequency divisors: base frequencies / factors = transformers' llama3 frequencies
    hf = transformers.AutoConfig.from_pretrained(ckpt)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    dim = hf.head_dim
    base = 1.0 / (hf.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factors = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data))
    torch.testing.assert_close(base / factors, inv_freq.float(), rtol=1e-6, atol=0)
    assert len(set(factors.tolist())) > 2  # unscaled, blended and fully scaled frequencies all occur


def test_tokenizer_matches_transformers(apertus_tokenizer_json, ckpt, reader):
    meta = fields(reader)
    hf = transformers.AutoTokenizer.from_pretrained(ckpt)
    n = len(hf)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "tekken"
    assert meta["tokenizer.ggml.tokens"] == hf.convert_ids_to_tokens(list(range(n)))
    added = hf.added_tokens_decoder
    expected_types = [(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
                      if i in added else gguf.TokenType.NORMAL for i in range(n)]
    assert meta["tokenizer.ggml.token_type"] == expected_types
    assert [i for i, t in enumerate(expected_types) if t == gguf.TokenType.USER_DEFINED] == [14, 15, 16, 17]
    merges = json.loads(apertus_tokenizer_json.read_text())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert meta["tokenizer.ggml.bos_token_id"] == hf.bos_token_id == 1
    assert meta["tokenizer.ggml.eos_token_id"] == hf.eos_token_id == 68  # instruct: <|assistant_end|>
    assert meta["tokenizer.ggml.padding_token_id"] == hf.pad_token_id == 3
    assert meta["tokenizer.ggml.unknown_token_id"] == hf.unk_token_id == 0
    assert meta["tokenizer.ggml.add_bos_token"] is True and hf("x")["input_ids"][0] == 1
    assert meta["tokenizer.ggml.add_space_prefix"] is False
    assert meta["tokenizer.chat_template"] == (apertus_tokenizer_json.parent / "chat_template.jinja").read_text()


def bf16_or_f16(t, torch_dtype, shape):
    return torch.from_numpy(np.array(t.data).view(np.int16)).view(torch_dtype).reshape(shape)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_half_precision_exports(small_ckpt, dtype, tmp_path):
    path, _ = small_ckpt
    reader = gguf.GGUFReader(export_gguf(path, tmp_path / f"m-{dtype}.gguf", dtype=dtype))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.APERTUS, N_LAYERS)
    tensors = {t.name: t for t in reader.tensors}
    qtype, torch_dtype = {"bf16": (gguf.GGMLQuantizationType.BF16, torch.bfloat16),
                          "f16": (gguf.GGMLQuantizationType.F16, torch.float16)}[dtype]
    assert fields(reader)["general.file_type"] == {"bf16": 32, "f16": 1}[dtype]
    for key, value in load_file(path / "model.safetensors").items():
        if ".act_fn." in key:
            continue
        t = tensors[names.get_name(key, try_suffixes=(".weight",))]
        if value.dim() == 1:  # norms stay F32 (llama.cpp kernels expect it)
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(t.data, value.numpy())
        else:  # fp32 checkpoint rounded to nearest-even, as torch does
            assert t.tensor_type == qtype
            assert torch.equal(bf16_or_f16(t, torch_dtype, value.shape), value.to(torch_dtype))


def test_bf16_checkpoint_round_trips_exactly(small_ckpt, tmp_path):
    _, tok = small_ckpt
    path = tmp_path / "ck16"
    save_model(random_model(tok.get_vocab_size(), seed=3, rope=None),
        path, dtype=torch.bfloat16, extra_files={"tokenizer.json": tok.to_str()})
    reader = gguf.GGUFReader(export_gguf(path, tmp_path / "m.gguf", dtype="bf16"))
    meta = fields(reader)
    state = load_file(path / "model.safetensors")
    for leaf in ("alpha_p", "alpha_n", "beta", "eps"):
        assert meta[f"xielu.{leaf}"] == [state[f"model.layers.{i}.mlp.act_fn.{leaf}"].item() for i in range(N_LAYERS)]
    assert "rope_freqs.weight" not in {t.name for t in reader.tensors}  # plain RoPE: no divisors
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.APERTUS, N_LAYERS)
    tensors = {t.name: t for t in reader.tensors}
    for key, value in state.items():
        if value.dim() == 2:
            assert torch.equal(bf16_or_f16(tensors[names.get_name(key, (".weight",))], torch.bfloat16, value.shape),
                               value)


def small_tokenizer(pre_tokenizer, vocab=400):
    """A byte-level BPE trained on a few lines, with the Apertus special-token layout (ids 0-3, 61-72)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>", "<pad>"] + [f"<SPECIAL_{i}>" for i in range(4, 61)] + [
        "<|system_start|>", "<|system_end|>", "<|developer_start|>", "<|developer_end|>", "<|user_start|>",
        "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>", "<|inner_prefix|>", "<|inner_suffix|>",
        "<|tools_prefix|>", "<|tools_suffix|>"]
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(PROMPTS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def test_padded_vocabulary_and_bad_inputs(small_ckpt, tmp_path):
    from tokenizers import pre_tokenizers

    src, tok = small_ckpt
    n_tok = tok.get_vocab_size()
    meta = fields(gguf.GGUFReader(export_gguf(src, tmp_path / "m.gguf")))
    assert meta["tokenizer.ggml.tokens"][:n_tok] == [tok.id_to_token(i) for i in range(n_tok)]
    assert meta["tokenizer.ggml.tokens"][n_tok:] == [f"[PAD{i}]" for i in range(n_tok, n_tok + 20)]
    assert set(meta["tokenizer.ggml.token_type"][n_tok:]) == {gguf.TokenType.UNUSED}
    assert meta["tokenizer.ggml.token_type"][:73] == [gguf.TokenType.CONTROL] * 73
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.eos_token_id"] == 2  # no tokenizer_config.json: config.json's eos
    assert len(meta["tokenizer.ggml.merges"]) == len(json.loads(tok.to_str())["model"]["merges"]) > 50
    assert "tokenizer.chat_template" not in meta  # a base checkpoint without a template gets none

    path = tmp_path / "ck"
    shutil.copytree(src, path)
    with pytest.raises(ValueError, match="dtype"):
        export_gguf(path, tmp_path / "x.gguf", dtype="q4_0")
    gpt2_style = small_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False))
    (path / "tokenizer.json").write_text(gpt2_style.to_str())
    with pytest.raises(ValueError, match="pre-tokenizer"):
        export_gguf(path, tmp_path / "x.gguf")
    too_big = small_tokenizer(tok.pre_tokenizer)
    too_big.add_tokens([f"extra{i}" for i in range(21)])
    (path / "tokenizer.json").write_text(too_big.to_str())
    with pytest.raises(ValueError, match="do not fit"):
        export_gguf(path, tmp_path / "x.gguf")
    (path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        export_gguf(path, tmp_path / "x.gguf")
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_gguf(tmp_path / "nowhere", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_failed_write_keeps_the_old_file(small_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous export")
    calls = []

    def failing(data, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise OSError("disk full")
        return data.astype(np.float32)

    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(small_ckpt[0], out)
    assert out.read_bytes() == b"previous export"
    assert os.listdir(tmp_path) == ["m.gguf"]  # no temporary file left behind


def llama_cpp_worst_diff(gguf_file, ckpt, texts):
    """Tokenize each (text, ids, is_chat) with llama.cpp, check the ids, run both models; max |diff| / max |logit|."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from apertus.checkpoint import load_model

    # f32 KV cache: the default f16 cache alone costs ~1e-3 in the logits
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=256, logits_all=True, verbose=False, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    model = load_model(ckpt)
    worst = 0.0
    try:
        for text, ids, is_chat in texts:
            # chat text carries its own <s> and special tokens: parse specials, add no BOS
            assert llm.tokenize(text.encode(), add_bos=not is_chat, special=is_chat) == ids
            llm.reset()
            llm.eval(ids)
            theirs = torch.from_numpy(np.array(llm.scores[: len(ids)]))
            with torch.no_grad():
                ours = model(torch.tensor([ids]))[0]
            worst = max(worst, (theirs - ours).abs().max().item() / ours.abs().max().item())
            assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    finally:
        llm.close()
    print(f"llama-cpp-python {llama_cpp.__version__}: max |logit diff| / max |logit| = {worst:.2e}")
    return worst


def test_llama_cpp_runs_the_export(ckpt, exported):
    """llama.cpp (via llama-cpp-python, optional extra `llama`) tokenizes like HF and computes our logits."""
    pytest.importorskip("llama_cpp")
    hf = transformers.AutoTokenizer.from_pretrained(ckpt)
    chat = hf.apply_chat_template([{"role": "user", "content": "Hi \\boxed{4}"}], tokenize=False,
                                  add_generation_prompt=True)
    texts = [(t, hf(t)["input_ids"], False) for t in PROMPTS]
    texts.append((chat, hf(chat, add_special_tokens=False)["input_ids"], True))
    assert llama_cpp_worst_diff(exported, ckpt, texts) < 2e-5


def test_llama_cpp_runs_a_padded_vocabulary(small_ckpt, tmp_path):
    pytest.importorskip("llama_cpp")
    path, tok = small_ckpt
    out = export_gguf(path, tmp_path / "m.gguf")
    texts = [(t, tok.encode(t).ids, False) for t in PROMPTS]
    assert llama_cpp_worst_diff(out, path, texts) < 2e-5


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LLAMA_CPP_SRC"), reason="set LLAMA_CPP_SRC to a llama.cpp checkout (b6671+)")
def test_same_file_as_llama_cpp_converter(ckpt, reader, tmp_path):
    """Opt-in: llama.cpp's own convert_hf_to_gguf.py on the same checkpoint writes the same keys, values and tensors
    (needs the converter's imports: sentencepiece among them)."""
    src = os.environ["LLAMA_CPP_SRC"]
    ref_file = tmp_path / "ref.gguf"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([f"{src}/gguf-py", os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, f"{src}/convert_hf_to_gguf.py", str(ckpt), "--outfile", str(ref_file),
                    "--outtype", "f32"], check=True, env=env, capture_output=True)
    ref = gguf.GGUFReader(ref_file)
    assert fields(ref) == fields(reader)
    ours = {t.name: t for t in reader.tensors}
    assert sorted(ours) == sorted(t.name for t in ref.tensors)
    for t in ref.tensors:
        assert t.tensor_type == ours[t.name].tensor_type
        np.testing.assert_array_equal(t.data, ours[t.name].data)


def q8_0_block_bound(value: torch.Tensor) -> torch.Tensor:
    """Q8_0's worst error per weight: blocks of 32 along a row share one f16 scale d = max|block| / 127 and round to
    the nearest multiple of it (half a step), plus the scale's own f16 rounding times up to 127 steps."""
    amax = value.abs().reshape(value.shape[0], -1, 32).amax(-1, keepdim=True)
    d = amax / 127
    return (d * (0.5 + 127 * 2**-11) * 1.01).expand(-1, -1, 32).reshape(value.shape)


def test_q8_0_export_dequantizes_to_the_checkpoint(small_ckpt, tmp_path):
    """`apertus export --format gguf --quant q8_0`: matrices Q8_0 (gguf-py's quantizer), within Q8_0's block error of
    the checkpoint once dequantized by gguf-py; norms exact in F32; rows not a multiple of 32 long fall back to F16."""
    from apertus.cli import main

    path, tok = small_ckpt
    out = tmp_path / "m-q8_0.gguf"
    assert main(["export", str(path), "--format", "gguf", "--quant", "q8_0", "--out", str(out)]) == 0
    reader = gguf.GGUFReader(out)
    assert fields(reader)["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0) == 7
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.APERTUS, N_LAYERS)
    tensors = {t.name: t for t in reader.tensors}
    matrices = 0
    for key, value in load_file(path / "model.safetensors").items():
        if ".act_fn." in key:
            continue
        t = tensors[names.get_name(key, try_suffixes=(".weight",))]
        if value.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(t.data, value.numpy())
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        back = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert back.shape == value.shape
        err = (back - value).abs()
        assert (err <= q8_0_block_bound(value)).all(), key
        assert err.max() > 0  # quantized, not copied
        matrices += 1
    assert matrices == 2 + 6 * N_LAYERS  # embeddings, output; q, k, v, o, up, down per layer

    odd = tmp_path / "odd"  # MLP 80 wide: the down projection's rows are 80 long
    cfg = ApertusConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=80, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)
    save_model(build_model(cfg), odd, extra_files={"tokenizer.json": tok.to_str()})
    odd_file = export_gguf(odd, tmp_path / "o.gguf", quant="q8_0")
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(odd_file).tensors}
    assert kinds["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    assert kinds["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0


def test_k_quants_go_through_llama_cpp_or_say_how_to_get_it(small_ckpt, tmp_path):
    path, _ = small_ckpt
    with pytest.raises(ValueError, match="not supported; use one of q8_0, q4_0"):
        export_gguf(path, tmp_path / "x.gguf", quant="q3")
    from apertus.train.checkpointing import export

    with pytest.raises(ValueError, match="--quant is for --format gguf"):
        export(path, tmp_path / "x", fmt="hf", quant="q8_0")
    out = tmp_path / "m-q4_k_m.gguf"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"needs llama.cpp's quantizer: pip install 'apertus\[llama\]'"):
            export_gguf(path, out, quant="q4_k_m")
        assert os.listdir(tmp_path) == []
        return
    export_gguf(path, out, quant="q4_k_m")
    reader = gguf.GGUFReader(out)
    assert fields(reader)["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert os.listdir(tmp_path) == [out.name]  # the intermediate GGUF is gone
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.APERTUS, N_LAYERS)
    tensors = {t.name: t for t in reader.tensors}
    for key, value in load_file(path / "model.safetensors").items():
        if value.dim() == 2:  # whatever type llama.cpp chose for each matrix, it dequantizes near the weights
            t = tensors[names.get_name(key, try_suffixes=(".weight",))]
            back = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            assert (back - value).norm() <= 0.2 * value.norm(), key


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LLAMA_CPP_SRC"), reason="set LLAMA_CPP_SRC to a llama.cpp checkout (b6671+)")
def test_same_q8_0_file_as_llama_cpp_converter(small_ckpt, tmp_path):
    """Opt-in: llama.cpp's converter with --outtype q8_0 writes the same tensor types and bytes as --quant q8_0."""
    src, path = os.environ["LLAMA_CPP_SRC"], small_ckpt[0]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([f"{src}/gguf-py", os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, f"{src}/convert_hf_to_gguf.py", str(path), "--outfile", str(tmp_path / "ref.gguf"),
                    "--outtype", "q8_0"], check=True, env=env, capture_output=True)
    ref = gguf.GGUFReader(tmp_path / "ref.gguf")
    ours = {t.name: t for t in gguf.GGUFReader(export_gguf(path, tmp_path / "m.gguf", quant="q8_0")).tensors}
    assert fields(ref)["general.file_type"] == 7 and sorted(ours) == sorted(t.name for t in ref.tensors)
    for t in ref.tensors:
        assert t.tensor_type == ours[t.name].tensor_type
        np.testing.assert_array_equal(t.data, ours[t.name].data)
