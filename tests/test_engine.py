"""The engine against transformers' `generate` (tokens and log-probabilities), against itself run alone (continuous
batching, preemption, seeds), and against the real Apertus tokenizer (stop strings, streaming text)."""

import asyncio
import io
import os
import re
import subprocess
import sys
import threading

import pytest
import torch
import transformers
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from apertus import ApertusConfig, build_model, save_model
from apertus.cli import main
from apertus.infer import Delta, Engine, EngineBusy, Request, SamplingParams
from apertus.tokenizer import Tokenizer

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def hf_checkpoint(path, seed=0, **kw):
    """A random transformers ApertusForCausalLM saved to `path` (weights far from init, xIELU alphas included)."""
    spec = dict(vocab_size=257, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                rope_parameters=dict(LLAMA3, rope_theta=10000.0))
    spec.update(kw)
    torch.manual_seed(seed)
    model = transformers.ApertusForCausalLM(transformers.ApertusConfig(**spec)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return model


def prompts(n, vocab=257, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or torch.randint(1, 90, (n,), generator=g).tolist()
    return [[1] + torch.randint(4, vocab, (k - 1,), generator=g).tolist() for k in lengths]


GREEDY = SamplingParams(temperature=0, max_tokens=24, logprobs=True, top_logprobs=4)


@pytest.fixture(scope="module")
def ref_and_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck")
    return hf_checkpoint(path), path


@pytest.fixture(scope="module")
def engine(ref_and_dir):
    with Engine(ref_and_dir[1], prefill_chunk=64, max_batch=16) as e:
        yield e


@pytest.mark.parametrize("spec", [dict(), dict(num_key_value_heads=1, head_dim=24, num_hidden_layers=3),
                                  dict(num_key_value_heads=4, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 500.0})])
def test_greedy_equals_transformers_generate(spec, tmp_path):
    ref = hf_checkpoint(tmp_path, seed=1, **spec)
    ps = prompts(4, seed=1, lengths=[1, 5, 37, 120])
    with Engine(tmp_path, prefill_chunk=32) as engine:  # the 120-token prompt is read in 4 chunks
        outs = engine.generate(ps, GREEDY)
    for p, out in zip(ps, outs, strict=True):
        g = ref.generate(torch.tensor([p]), do_sample=False, max_new_tokens=24, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=3, eos_token_id=2)
        hf_tokens = g.sequences[0, len(p):].tolist()
        assert out.output_ids == hf_tokens
        ref_lp = torch.stack([torch.log_softmax(x[0].float(), -1) for x in g.logits])
        chosen = ref_lp.gather(1, torch.tensor(hf_tokens)[:, None]).squeeze(1)
        assert (torch.tensor(out.logprobs) - chosen).abs().max() <= 1e-4
        top = torch.tensor([[lp for _, lp in step] for step in out.top_logprobs])
        assert (top - ref_lp.topk(4).values).abs().max() <= 1e-4
        assert [[i for i, _ in step] for step in out.top_logprobs] == ref_lp.topk(4).indices.tolist()
        assert out.finish_reason == ("stop" if hf_tokens[-1] == 2 else "length")


def test_bf16_engine_follows_transformers_bf16(ref_and_dir):
    _, path = ref_and_dir
    ps = prompts(3, seed=2)
    with Engine(path, dtype="bf16") as engine:
        assert engine.cache.dtype == engine.cache.k[0].dtype == torch.bfloat16
        outs = engine.generate(ps, SamplingParams(temperature=0, max_tokens=12, logprobs=True, ignore_eos=True))
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    for p, out in zip(ps, outs, strict=True):  # teacher-forced: the reference's log-probs of the engine's tokens
        seq = torch.tensor([p + out.output_ids])
        with torch.no_grad():
            lp = torch.log_softmax(ref(seq).logits[0, len(p) - 1:-1].float(), -1)
        chosen = lp.gather(1, torch.tensor(out.output_ids)[:, None]).squeeze(1)
        assert (torch.tensor(out.logprobs) - chosen).abs().max() <= 0.1
        assert (lp.max(-1).values - chosen).max() <= 0.1  # greedy up to bf16 noise


def test_int8_weights_stay_close_to_transformers_fp32(ref_and_dir):
    ref, path = ref_and_dir
    ps = prompts(3, seed=9)
    with Engine(path, quantize="int8") as engine:
        outs = engine.generate(ps, SamplingParams(temperature=0, max_tokens=12, logprobs=True, ignore_eos=True))
    for p, out in zip(ps, outs, strict=True):
        with torch.no_grad():
            lp = torch.log_softmax(ref(torch.tensor([p + out.output_ids])).logits[0, len(p) - 1:-1], -1)
        chosen = lp.gather(1, torch.tensor(out.output_ids)[:, None]).squeeze(1)
        assert (torch.tensor(out.logprobs) - chosen).abs().max() <= 0.05
        assert (lp.max(-1).values - chosen).max() <= 0.05


def test_batched_equals_alone_with_chunked_prefill(engine):
    ps = prompts(16, seed=3)  # 16 mixed lengths, more prompt tokens than one prefill chunk
    params = [SamplingParams(temperature=0, max_tokens=8 + 3 * i, logprobs=True) for i in range(16)]
    before = dict(engine.stats)
    together = engine.generate(ps, params)
    assert engine.stats["steps"] - before["steps"] < sum(p.max_tokens for p in params) / 4  # really batched
    for p, sp, out in zip(ps, params, together, strict=True):
        [alone] = engine.generate([p], sp)
        assert out.output_ids == alone.output_ids
        assert max(abs(a - b) for a, b in zip(out.logprobs, alone.logprobs, strict=True)) <= 1e-4


def test_compiled_steps_equal_eager_and_compile_only_at_start(ref_and_dir, engine):
    ps = prompts(6, seed=11)  # up to 85 tokens: prompts packed, and continued in a second chunk
    params = [SamplingParams(temperature=0, max_tokens=10 + 4 * i, logprobs=True) for i in range(6)]
    graphs = torch._dynamo.utils.counters["stats"]
    code = type(engine.model).hidden_states.__code__  # dynamo keeps the compiled graphs on this code object
    with Engine(ref_and_dir[1], prefill_chunk=64, max_batch=16, compile=True) as compiled:
        warm = dict(graphs)
        assert len(_debug_get_cache_entry_list(code)) >= 2  # one row, several rows, prompts...
        assert set(compiled.stats.values()) == {0}  # the warm-up is not counted as served work
        outs = compiled.generate(ps, params) + compiled.generate(ps[:1], params[0])
        assert dict(graphs) == warm  # batches of 1..6 rows, every prompt shape, growing keys: no new graph
    assert not _debug_get_cache_entry_list(code)  # the last compiled engine closed takes its graphs along
    expected = engine.generate(ps, params) + engine.generate(ps[:1], params[0])
    for out, ref in zip(outs, expected, strict=True):
        assert out.output_ids == ref.output_ids
        assert max(abs(a - b) for a, b in zip(out.logprobs, ref.logprobs, strict=True)) <= 1e-4


def test_preemption_when_the_cache_is_full_changes_nothing(ref_and_dir, engine):
    ps = prompts(8, seed=4, lengths=[60, 50, 40, 70, 30, 64, 45, 55])
    sp = SamplingParams(temperature=0, max_tokens=40)
    expected = [o.output_ids for o in engine.generate(ps, sp)]
    per_token = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 kv heads, head_dim 16, fp32
    with Engine(ref_and_dir[1], cache_gb=256 * per_token / 2**30, page_size=8) as small:  # room for ~2 requests
        outs = small.generate(ps, sp)
        assert small.stats["preemptions"] > 0
        assert small.cache.n_free == small.cache.n_pages  # everything given back
    assert [o.output_ids for o in outs] == expected


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    ps = prompts(6, seed=5)
    sp = [SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=100 + i, max_tokens=16) for i in range(6)]
    together = [o.output_ids for o in engine.generate(ps, sp)]
    alone = [engine.generate([p], s)[0].output_ids for p, s in zip(ps, sp, strict=True)]
    assert together == alone
    again = [o.output_ids for o in engine.generate(ps[::-1], sp[::-1])][::-1]  # other order, other neighbours
    assert again == together
    other = engine.generate([ps[0]], SamplingParams(temperature=1.0, seed=7, max_tokens=16))[0].output_ids
    assert other != together[0]


def test_concurrent_submitters_and_streams(engine):
    ps = prompts(8, seed=6)
    sp = SamplingParams(temperature=0, max_tokens=10)
    expected = [o.output_ids for o in engine.generate(ps, sp)]
    got = [None] * 8

    def worker(i):
        tokens = []
        for delta in engine.submit(ps[i], sp):
            tokens += delta.token_ids
        got[i] = tokens

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == expected


def test_asyncio_consumer_via_on_event(engine):
    """The pattern the server uses: the engine thread hands each Delta to the event loop."""
    p, sp = prompts(1, seed=10)[0], SamplingParams(temperature=0, max_tokens=12)
    [expected] = engine.generate([p], sp)

    async def consume():
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        engine.submit(p, sp, on_event=lambda d: loop.call_soon_threadsafe(q.put_nowait, d))
        tokens = []
        while True:
            d = await q.get()
            tokens += d.token_ids
            if d.finish_reason:
                return tokens, d.finish_reason

    assert asyncio.run(consume()) == (expected.output_ids, expected.finish_reason)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engine, monkeypatch):
    real = engine.model.hidden_states

    def broken(*a, **k):
        monkeypatch.setattr(engine.model, "hidden_states", real)
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.model, "hidden_states", broken)
    h = engine.submit([1, 5, 6], SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError, match="boom"):
        h.result(timeout=60)
    assert h.finish_reason == "error" and engine.cache.n_free == engine.cache.n_pages
    assert engine.generate([[1, 5, 6]], SamplingParams(max_tokens=4))[0].finish_reason == "length"


def test_cancel_frees_the_cache_at_once(engine):
    events = []
    h = engine.submit(prompts(1, seed=7)[0], SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True),
                      on_event=events.append)
    it = iter(h)
    next(it)
    assert engine.cache.n_free < engine.cache.n_pages  # it holds pages while it runs
    h.cancel()
    assert h.finish_reason == "cancelled" and engine.cache.n_free == engine.cache.n_pages
    assert list(it)[-1].finish_reason == "cancelled"
    assert events[-1].finish_reason == "cancelled" and len(h.output_ids) < 3000
    assert engine.generate([[1, 5]], SamplingParams(temperature=0, max_tokens=3))[0].finish_reason == "length"


def test_the_handle_filters_its_stream_and_drops_pieces_after_the_end():
    """The handle builds its results from the Deltas the engine gives it; the output filter runs there."""

    class HoldThenUpper:  # holds everything back until the end, as a filter waiting for a whole match does
        def __init__(self):
            self.held = ""

        def feed(self, text):
            self.held += text
            return ""

        def flush(self):
            out, self.held = self.held.upper(), ""
            return out

    cancelled, seen = [], []
    h = Request("r", [1], SamplingParams(), cancel=lambda: cancelled.append("r"), on_event=seen.append,
                output_filter=HoldThenUpper)
    h.deliver(Delta("ab", [5], [-0.5]))
    h.deliver(Delta("c", [6], [-0.25], finish_reason="stop"), stop_reason=6)
    h.deliver(Delta("late", [7], [-1.0]))  # a step's piece that lost the race against a cancel
    assert [d.text for d in h] == ["", "ABC"] and [d.text for d in seen] == ["", "ABC"]
    assert (h.text, h.output_ids, h.logprobs, h.finish_reason, h.stop_reason) == ("ABC", [5, 6], [-0.5, -0.25],
                                                                                  "stop", 6)
    assert h.result(timeout=0) is h and not cancelled

    def failing(delta):
        raise ValueError("consumer gone")

    h2 = Request("r2", [1], SamplingParams(), cancel=lambda: cancelled.append("r2"), on_event=failing)
    h2.deliver(Delta("x", [5]))
    assert cancelled == ["r2"]  # a failing consumer cancels its request


def test_clear_errors_before_any_compute(ref_and_dir):
    with Engine(ref_and_dir[1], cache_gb=0.001, max_queue=1, max_batch=1) as e:
        capacity = e.cache.capacity
        assert capacity < 4096
        with pytest.raises(ValueError, match="context of 4,096"):
            e.submit([1] * 100, SamplingParams(max_tokens=4000))
        with pytest.raises(ValueError, match="KV-cache budget"):
            e.submit([1] * 100, SamplingParams(max_tokens=capacity))
        for bad, match in (([], "empty"), ([1, 300], "token ids"), ("text", "tokenizer")):
            with pytest.raises(ValueError, match=match):
                e.submit(bad)
        assert e.stats["forwards"] == 0
        # max_tokens=None fills the budget; a full queue answers EngineBusy
        long = e.submit([1, 5], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
        assert long.params.max_tokens == capacity - 2
        next(iter(long))  # running: the queue is empty again
        e.submit([1, 6], SamplingParams(max_tokens=2))
        with pytest.raises(EngineBusy):
            e.submit([1, 7], SamplingParams(max_tokens=2))
        long.cancel()


@pytest.mark.slow
def test_long_context_60000_matches_transformers(tmp_path):
    """Real Apertus RoPE (theta 12M, llama3 x8 from 8192) on a prompt of 60,000 tokens read in chunks."""
    rope = dict(LLAMA3, original_max_position_embeddings=8192, rope_theta=12_000_000.0)
    ref = hf_checkpoint(tmp_path, seed=3, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=1, num_key_value_heads=1, head_dim=16, max_position_embeddings=65536,
                        rope_parameters=rope)
    prompt = prompts(1, vocab=64, seed=8, lengths=[60_000])[0]
    with Engine(tmp_path, prefill_chunk=4096, cache_gb=0.05) as engine:
        [out] = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=3, top_logprobs=5,
                                                         logprobs=True, ignore_eos=True))
    with torch.no_grad():
        logits = ref(torch.tensor([prompt + out.output_ids[:-1]]), logits_to_keep=3).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    assert out.output_ids == lp.argmax(-1).tolist()
    ours = torch.tensor([[v for _, v in step] for step in out.top_logprobs])
    assert (ours - lp.topk(5).values).abs().max() <= 1e-4
    # the scaling matters at this distance: plain RoPE gives other logits
    assert ApertusConfig(rope_scaling=None).inv_freq()[-1] != ApertusConfig().inv_freq()[-1]


def bigram_checkpoint(path, chains, tokenizer_json, instruct):
    """An Apertus model with the real vocabulary whose greedy output is known: each token of a chain predicts the
    next (attention and MLP outputs zeroed, embedding -> lm_head), so text tests have an exact expected answer."""
    cfg = ApertusConfig(vocab_size=131072, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    model = build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    heads = [t for chain in chains for t in chain[:-1]]
    assert len(set(heads)) == len(heads), "a token may predict only one successor"
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        for chain in chains:
            for a, b in zip(chain[:-1], chain[1:], strict=True):
                u = torch.randn(64, generator=g)
                model.model.embed_tokens.weight[a] = u / u.norm()
                model.lm_head.weight[b] += 50 * u / u.norm()  # a token may follow several
    save_model(model, path, instruct=instruct, extra_files={"tokenizer.json": tokenizer_json.read_text()})


TEXT = "Grüezi mitenand! Ça va? Привет, мир. 日本語のテキスト 🦀 ½"
REPLY = "Hoi zäme wie gohts"  # the instruct model's answer after <|assistant_start|>


@pytest.fixture(scope="module")
def text_models(tmp_path_factory, apertus_tokenizer_json):
    """Base and instruct checkpoints (real tokenizer) that answer <s> with TEXT, then <|assistant_end|>, then </s>,
    and <|assistant_start|> with REPLY, then <|assistant_end|>."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(apertus_tokenizer_json))
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    reply = tok.encode(REPLY, add_special_tokens=False).ids
    dirs, engines = {}, {}
    for kind in ("base", "instruct"):
        dirs[kind] = tmp_path_factory.mktemp(kind)
        bigram_checkpoint(dirs[kind], [[1] + ids + [68, 2], [67] + reply + [68]], apertus_tokenizer_json,
                          instruct=kind == "instruct")
        engines[kind] = Engine(dirs[kind], tokenizer=tok)
    yield tok, ids, dirs, engines
    for e in engines.values():
        e.close()


def test_stop_ids_from_generation_config_and_streaming_text(text_models):
    tok, ids, _, engines = text_models
    # instruct: generation_config eos [2, 68, 72], so <|assistant_end|> ends the reply
    h = engines["instruct"].submit([1], SamplingParams(temperature=0, max_tokens=100))
    pieces = [d.text for d in h]
    assert h.output_ids == ids + [68] and h.finish_reason == "stop" and h.stop_reason == 68
    assert h.text == TEXT == tok.decode(ids) == "".join(pieces)
    assert all("\ufffd" not in p for p in pieces) and sum(p == "" for p in pieces) >= 2  # emoji bytes held back
    # base: EOS only; <|assistant_end|> is just text
    [out] = engines["base"].generate([[1]], SamplingParams(temperature=0, max_tokens=100))
    assert out.output_ids == ids + [68, 2] and out.text == TEXT + "<|assistant_end|>" and out.stop_reason == 2
    [out] = engines["base"].generate([[1]], SamplingParams(temperature=0, max_tokens=5))
    assert out.output_ids == ids[:5] and out.finish_reason == "length" and out.text == tok.decode(ids[:5])


@pytest.mark.parametrize("stop", ["мир", "va? П", "🦀", "½"])
def test_stop_strings_end_at_the_right_place(text_models, stop):
    tok, ids, _, engines = text_models
    h = engines["base"].submit([1], SamplingParams(temperature=0, max_tokens=100, stop=[stop, "never seen"]))
    pieces = [d.text for d in h]
    assert h.finish_reason == "stop" and h.stop_reason == stop
    assert h.text == TEXT[:TEXT.index(stop)] == "".join(pieces)
    n = len(h.output_ids)  # the last token is the one that completed the stop string
    assert stop in tok.decode(ids[:n]) and stop not in tok.decode(ids[:n - 1])


def test_streamed_text_equals_decode_for_random_multilingual_tokens(tmp_path, apertus_tokenizer_json):
    """Random weights over the real vocabulary: arbitrary byte tokens, split characters, invalid UTF-8."""
    cfg = ApertusConfig(vocab_size=131072, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    save_model(build_model(cfg, seed=1), tmp_path, extra_files={"tokenizer.json":
                                                                    apertus_tokenizer_json.read_text()})
    with Engine(tmp_path) as e:
        handles = [e.submit(TEXT[:k], SamplingParams(temperature=1.5, top_p=1.0, seed=k, max_tokens=40,
                                                     ignore_eos=True))
                   for k in range(2, 30, 3)]
        for h in handles:
            streamed = "".join(d.text for d in h)
            assert streamed == h.text == e.tokenizer.decode(h.output_ids, skip_special_tokens=False)


def run_cli(*args, stdin=None):
    proc = subprocess.run([sys.executable, "-m", "apertus.cli", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


def test_generate_command(text_models):
    _, _, dirs, _ = text_models
    out, err = run_cli("generate", dirs["base"], "--prompt", "", "--temperature", "0", "--max-tokens", "50")
    assert out == TEXT + "<|assistant_end|>\n" and "finish: stop" in err


def test_generate_command_stop_strings_and_errors(text_models, capsys):
    base = str(text_models[2]["base"])
    assert main(["generate", base, "--prompt", "", "--temperature", "0", "--stop", "Привет", "--stop", "🦀"]) == 0
    assert capsys.readouterr().out == TEXT[:TEXT.index("Привет")] + "\n"
    assert main(["generate", base, "--prompt", "x", "--max-tokens", "70000"]) == 2
    assert "exceeds the model's context of 65,536" in capsys.readouterr().err
    assert main(["generate", base, "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_generate_command_quantized(text_models, capsys, mode):
    base = str(text_models[2]["base"])
    assert main(["generate", base, "--prompt", "", "--temperature", "0", "--max-tokens", "50", "--quantize", mode]) == 0
    assert capsys.readouterr().out == TEXT + "<|assistant_end|>\n"


def test_chat_command(text_models):
    out, _ = run_cli("chat", text_models[2]["instruct"], "--temperature", "0",
                     stdin="Grüezi\n/think on\nNo chli meh\n/reset\n/system Du bisch en Bärner.\nHoi\n/quit\n")
    assert out.count(REPLY) == 3 and "[deliberation on]" in out and "[conversation reset]" in out


def test_chat_loop_shows_reasoning_apart_and_keeps_the_answer(tmp_path, apertus_tokenizer_json):
    from apertus.infer.repl import chat_loop

    tok = Tokenizer.from_file(apertus_tokenizer_json)
    think, answer = tok.encode("Let me think", bos=False), tok.encode("Forty-two", bos=False)
    bigram_checkpoint(tmp_path, [[67, 69] + think + [70] + answer + [68]], apertus_tokenizer_json, instruct=True)
    lines, out, prompts_seen = iter(["What is 6 x 7?", "And 7 x 6?"]), io.StringIO(), []

    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    with Engine(tmp_path) as e:
        submit = e.submit
        e.submit = lambda ids, params: prompts_seen.append(ids) or submit(ids, params)
        chat_loop(e, SamplingParams(temperature=0, max_tokens=50), thinking=True, read=read, out=out)
    assert out.getvalue().count("[reasoning] Let me think\n[answer] Forty-two\n") == 2
    second = tok.decode(prompts_seen[1])
    assert "Deliberation: enabled" in second and "<|assistant_start|>Forty-two<|assistant_end|>" in second
    assert "Let me think" not in second  # reasoning of earlier turns is not fed back


@pytest.mark.slow
def test_compile_cache_serves_a_second_process(small_checkpoint, tmp_path):
    """`--compile` in a fresh process loads every graph the first one compiled from the cache folder."""
    cache = tmp_path / "inductor"
    env = {**os.environ, "APERTUS_COMPILE_CACHE": str(cache)}
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "apertus.cli", "generate", str(small_checkpoint), "--compile",
                               "--prompt", "Grüezi", "--temperature", "0", "--max-tokens", "2"],
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr
        runs.append(re.search(r"apertus generate: compiled in [\d.]+ s \((.*)\)", proc.stderr).group(1))
        if len(runs) == 1:
            assert any((cache / "fxgraph").rglob("*")) and any((cache / "aotautograd").rglob("*")), runs
    cold = re.fullmatch(rf"cold cache: (\d+) graphs compiled into {re.escape(str(cache))}", runs[0])
    assert cold and int(cold.group(1)) > 0, runs
    assert runs[1] == f"{cold.group(1)} graphs from cache {cache}", runs


def test_compile_cache_dir_choice_and_errors(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from apertus.infer.engine import _compile_cached, compile_cache_dir

    monkeypatch.delenv("APERTUS_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # as torch leaves it once it has compiled
    assert compile_cache_dir() == tmp_path / "apertus" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's own choice is kept
    assert compile_cache_dir() == tmp_path / "mine"
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("APERTUS_COMPILE_CACHE", str(tmp_path / "file" / "inductor"))
    assert compile_cache_dir() == tmp_path / "file" / "inductor"
    with pytest.raises(ValueError, match="cannot create the compile cache .*file/inductor.*APERTUS_COMPILE_CACHE"):
        _compile_cached(lambda: pytest.fail("compiled without a cache"))
