"""Prefix caching (cache.py, engine.py): the cache's bookkeeping (reference counts, least-recently-used eviction,
never a page a running request holds) and greedy outputs token for token equal to an engine without it, for shared
prefixes, n samples of one prompt, preemption, cancellation, concurrent submitters and the compiled steps."""

import threading

import pytest
import torch
from test_engine import hf_checkpoint, prompts
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from apertus import ApertusConfig
from apertus.infer import Engine, SamplingParams
from apertus.infer.cache import PagedKVCache

PAGE = 8
GREEDY = SamplingParams(temperature=0, max_tokens=12, logprobs=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck")
    hf_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def engines(ckpt):
    """The same model with prefix caching (on by default) and without."""
    with Engine(ckpt, prefill_chunk=64, max_batch=16, page_size=PAGE) as on, \
            Engine(ckpt, prefill_chunk=64, max_batch=16, page_size=PAGE, prefix_caching=False) as off:
        yield on, off


def shared(n, seed, system=70):
    """n prompts that start with the same `system` tokens, then differ (a suffix of 0 to 40 tokens)."""
    head = prompts(1, seed=seed, lengths=[system])[0]
    tails = prompts(n, seed=seed + 1, lengths=[1 + (7 * i) % 41 for i in range(n)])
    return [head + t[1:] for t in tails]


def assert_all_released(cache: PagedKVCache):
    """Nothing held: every page blank or cached-and-evictable, each exactly once, the key maps consistent."""
    assert cache.refs == [0] * cache.n_pages
    assert sorted(cache.free_pages + list(cache.evictable)) == list(range(cache.n_pages))
    assert {cache.page_hash[p] for p in cache.evictable} == set(cache.by_hash)
    assert all(cache.page_hash[p] is None for p in cache.free_pages)
    assert all(cache.page_hash[p] == k for k, p in cache.by_hash.items())


def same(outs, refs):
    assert [o.output_ids for o in outs] == [r.output_ids for r in refs]
    for o, r in zip(outs, refs, strict=True):
        assert max(abs(a - b) for a, b in zip(o.logprobs, r.logprobs, strict=True)) <= 1e-4


def test_cache_shares_counts_and_evicts_least_recently_released_first():
    cfg = ApertusConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    cache = PagedKVCache(cfg, n_pages=6, page_size=4, dtype=torch.float32, device="cpu")
    a_tokens, b_tokens = list(range(12)), list(range(8)) + [50, 51, 52, 53]
    a_keys, b_keys = cache.hashes(a_tokens, [], 3), cache.hashes(b_tokens, [], 3)
    assert a_keys[:2] == b_keys[:2] and a_keys[2] != b_keys[2]  # a chain: equal prefix, equal keys
    assert cache.hashes(list(range(1, 9)), [], 2)[1] != a_keys[1]  # the same 4 tokens after another prefix
    a = []
    assert cache.grow(a, 12) and cache.match([], a_keys) == 0
    cache.register(a, a_keys)
    b = []
    assert cache.match(b, b_keys) == 2 and b == a[:2] and cache.refs[a[0]] == 2  # shared, counted
    assert cache.grow(b, 12) and b[2] not in a and cache.n_free == 2
    cache.register(b, b_keys)
    cache.release(a)  # a's pages 0-1 are still b's; page 2 becomes evictable
    assert list(cache.evictable) == [a[2]] and cache.refs[a[0]] == 1
    cache.release(b)  # released last page first: b's tail goes before the prefix both share
    assert list(cache.evictable) == [a[2], b[2], b[1], b[0]]
    c = []
    assert cache.grow(c, 16)  # 2 blank pages, then the 2 least recently released cached ones
    assert set(c) == set(range(6)) - {b[1], b[0]} and cache.by_hash == {b_keys[0]: b[0], b_keys[1]: b[1]}
    d = []
    assert cache.match(d, a_keys) == 2 and d == b[:2]  # the evicted third page's key is gone
    assert not cache.grow(d, 16)  # c holds 4, d 2: full; nothing held is evicted, nothing taken
    assert d == b[:2] and cache.refs[c[0]] == 1
    cache.release(c)
    cache.release(d)
    assert_all_released(cache)


def test_shared_prefixes_give_the_same_greedy_outputs(engines):
    on, off = engines
    ps = shared(10, seed=20) + [list(range(1, 49)), list(range(1, 49)), list(range(1, 57))]  # page multiples
    before, off_before = dict(on.stats), dict(off.stats)
    refs = off.generate(ps, GREEDY)
    same(on.generate(ps, GREEDY), refs)  # together: the first computes the prefix, the others wait and take it
    hits = on.stats["prefix_hit_tokens"] - before["prefix_hit_tokens"]
    assert hits >= 9 * 64 + 40  # 9 x the 70-token prefix's 8 full pages; the 48 tokens again (one short of the end)
    computed = on.stats["prefill_tokens"] - before["prefill_tokens"]
    assert computed + hits == off.stats["prefill_tokens"] - off_before["prefill_tokens"]  # what it did not compute
    outs = on.generate(ps, GREEDY)  # again: every full page of every prompt comes from the cache
    same(outs, refs)
    assert [o.cached_tokens for o in outs] == [(len(p) - 1) // PAGE * PAGE for p in ps]
    follow = [p + o.output_ids + [5, 6, 7] for p, o in zip(ps[:3], outs[:3], strict=True)]  # a chat's next turn
    same(on.generate(follow, GREEDY), off.generate(follow, GREEDY))
    assert_all_released(on.cache)


def test_n_samples_of_one_prompt_compute_the_prompt_once(engines):
    on, off = engines
    p = prompts(1, seed=30, lengths=[61])[0]
    before = dict(on.stats)
    outs = on.generate([p] * 8, GREEDY)
    same(outs, off.generate([p] * 8, GREEDY))
    assert on.stats["prefill_tokens"] - before["prefill_tokens"] == 61 + 7 * (61 - 56)  # 7 full pages shared
    assert sorted(o.cached_tokens for o in outs) == [0] + [56] * 7
    sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=10)  # seeded sampling does not see the cache
    assert on.generate([p], sampled)[0].output_ids == off.generate([p], sampled)[0].output_ids


def test_preemption_with_shared_pages_changes_nothing(ckpt, engines):
    _, off = engines
    ps = shared(8, seed=40, system=40)
    sp = SamplingParams(temperature=0, max_tokens=40)
    expected = [o.output_ids for o in off.generate(ps, sp)]
    per_token = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 kv heads, head_dim 16, fp32
    with Engine(ckpt, cache_gb=200 * per_token / 2**30, page_size=PAGE) as small:  # room for ~2 requests
        outs = small.generate(ps, sp)
        assert small.stats["preemptions"] > 0 and small.stats["prefix_hit_tokens"] > 0
        assert_all_released(small.cache)
        assert [o.output_ids for o in small.generate(ps, sp)] == expected
    assert [o.output_ids for o in outs] == expected


def test_cancelled_requests_leave_the_others_unchanged(engines):
    on, off = engines
    ps = shared(8, seed=50)
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    refs = [o.output_ids for o in off.generate(ps[1::2], GREEDY)]
    doomed = [on.submit(p, long) for p in ps[::2]]  # they compute the prefix the others take
    next(iter(doomed[0]))
    kept = [on.submit(p, GREEDY) for p in ps[1::2]]
    for h in doomed:
        h.cancel()
    assert [h.result(60).output_ids for h in kept] == refs
    assert all(h.finish_reason == "cancelled" for h in doomed)
    again = on.generate(ps[::2], GREEDY)  # the prefix the cancelled requests computed is sound
    assert [o.output_ids for o in again] == [o.output_ids for o in off.generate(ps[::2], GREEDY)]
    assert_all_released(on.cache)


def test_many_threads_with_overlapping_prompts(engines):
    on, off = engines
    ps = shared(6, seed=60) + shared(6, seed=61, system=30) + shared(4, seed=60, system=90)
    expected = [o.output_ids for o in off.generate(ps, GREEDY)]
    got = {}

    def worker(k):
        for i in range(k, len(ps) * 3, 6):  # every prompt three times, from different threads at once
            got[i] = [t for d in on.submit(ps[i % len(ps)], GREEDY, block=True) for t in d.token_ids]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got[i] for i in range(len(ps) * 3)] == expected * 3
    assert on.stats["prefix_hit_tokens"] > 0
    assert_all_released(on.cache)


def test_compiled_steps_continue_prompts_from_cached_pages(ckpt, engines):
    _, off = engines
    ps = shared(6, seed=70)
    graphs = torch._dynamo.utils.counters["stats"]
    with Engine(ckpt, prefill_chunk=64, max_batch=16, page_size=PAGE, compile=True) as compiled:
        warm = dict(graphs)
        outs = compiled.generate(ps, GREEDY) + compiled.generate(ps, GREEDY)
        assert dict(graphs) == warm  # continuing from cached pages is the chunked-prefill graph: no new graph
        assert compiled.stats["prefix_hit_tokens"] >= 11 * 64
    assert not _debug_get_cache_entry_list(type(compiled.model).hidden_states.__code__)
    same(outs, off.generate(ps, GREEDY) * 2)
