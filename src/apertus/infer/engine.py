"""The inference engine: one for the CLI, the server, evaluation and the QRPO sampler.

    engine = Engine("path/to/checkpoint")                         # or a model object, or a preset name
    [r] = engine.generate(["Grüezi"], SamplingParams(temperature=0, max_tokens=20)); r.text, r.output_ids
    handle = engine.submit(prompt_ids_or_text, params)           # thread-safe; returns at once
    for delta in handle: print(delta.text, end="")               # streams; handle.cancel() frees its cache now

Continuous batching: a background thread runs steps; between two steps requests join (FIFO from a bounded queue)
and leave (finished or cancelled). Each step runs every decoding request in one batched forward of one token each,
then at most `prefill_chunk` prompt tokens of the requests still reading their prompt, packed without padding into
single rows (chunked prefill: a long prompt never stalls the others for more than one chunk per step). Keys and
values go to a paged cache sized
from a memory budget (cache.py); when it fills up, the youngest request is preempted (its pages freed, its prompt and
output recomputed later), so admission needs only the prompt to fit. Stop tokens, stop strings and max_tokens end a
request, and so does the end of a constrained request's grammar (structured.py: before each sampling step the
grammar's matcher masks the tokens it forbids, row by row, so constrained and free requests share a step); text is
detokenized incrementally (tokenizers' DecodeStream: no broken UTF-8 between chunks) and the last
len(longest stop string) - 1 characters are held back so a streamed stop string is never shown.

Prefix caching (prefix_caching=True, the default; cache.py): before a request computes its prompt, it takes the
full pages that an earlier request with the same leading tokens left in the cache (a shared system prompt, the
history of a chat, n samples of one prompt) and feeds only the rest, as a prompt continued in a later chunk. When
an older request computes a page in this step that a younger one would compute too (n samples of one prompt
admitted together), the younger waits one step and takes it from the cache.

A caller holds a Request (request.py: the stream, the results, cancel); the scheduler keeps its own Sequence per
request (tokens, cache pages, sampler and detokenizer state) and hands the Request each Delta. An output filter (the
PII filter) runs on the Request's stream, so the scheduler sees only the model's own text.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import threading
from collections import deque
from pathlib import Path

import torch

from .cache import PagedKVCache
from .request import Delta, Request
from .sampler import SamplingParams, defaults_from_generation_config, sample
from .structured import Grammars, fill_masks

__all__ = ["Delta", "Engine", "EngineBusy", "Request", "SamplingParams"]

log = logging.getLogger(__name__)
_compiled_engines: set[int] = set()  # open engines with compile=True (their graphs live on the model's code object)


class EngineBusy(RuntimeError):
    """The request queue is full (the server answers 503); try again later."""


class Sequence:
    """The scheduler's state of one request (engine thread, under the engine's lock): what the model reads, its
    cache pages, the sampler's generator and penalty counts, the detokenizer. The caller holds `handle` only."""

    def __init__(self, handle: Request):
        self.handle, self.params = handle, handle.params
        self.n_prompt = len(handle.prompt_ids)
        self.tokens = list(handle.prompt_ids)  # prompt + output: what the model reads
        self.n_cached = 0
        self.pages: list[int] = []
        self.keys: list[bytes] = []  # prefix-cache keys of its full pages (tokens only grow: they stay valid)
        self.n_registered = 0  # pages whose keys are in the cache
        self.counted = False  # its prompt counted in the prefix-cache statistics
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.gen = torch.Generator().manual_seed(seed)
        self.text = ""  # the output's text as detokenized (before any output filter)
        self.emitted = 0  # characters of text already streamed
        self.decoder = None
        self.prompt_seen = self.out_counts = None
        self.matcher = None  # the grammar's state (llguidance LLMatcher) of a constrained request
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self.error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.n_prompt:]


def _load_tokenizer(tokenizer, model_dir: Path | None):
    """An `apertus.tokenizer.Tokenizer` from: None (the checkpoint's tokenizer.json, if any), a path, a Tokenizer or a
    bare `tokenizers.Tokenizer`."""
    from ..tokenizer import Tokenizer

    if tokenizer is None:
        has = model_dir is not None and (model_dir / "tokenizer.json").exists()
        return Tokenizer.from_file(model_dir) if has else None
    if isinstance(tokenizer, (str, Path)):
        return Tokenizer.from_file(tokenizer)
    return tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)


def _checkpoint_dtype(path: Path) -> torch.dtype:
    """The dtype a checkpoint was saved in (config.json torch_dtype / dtype), fp32 when it does not say."""
    import json

    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    return torch.bfloat16 if cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16" else torch.float32


def _packs(rows, max_keys: int):
    """Split prompt chunks into packs of at most max_keys keys (cached + new) each: a pack is one row whose tokens
    attend to all its keys (masked per request), so the wasted attention grows with the pack's keys squared."""
    packs, keys = [], max_keys
    for row in rows:
        k = row[0].n_cached + row[1]
        if keys + k > max_keys:
            packs.append([])
            keys = 0
        packs[-1].append(row)
        keys += k
    return packs


def compile_cache_dir() -> Path:
    """Where inductor keeps compiled graphs across processes (its FX graph and AOTAutograd caches, keyed by the graph
    and the config, so a second start with the same model shape loads them instead of compiling):
    $APERTUS_COMPILE_CACHE, else TORCHINDUCTOR_CACHE_DIR if set to other than torch's default under /tmp (which does
    not outlive a reboot, and which torch writes into the environment itself once it compiles), else
    `$XDG_CACHE_HOME/apertus/inductor` (`~/.cache/apertus/inductor`)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from ..embedded import cache_root

    if os.environ.get("APERTUS_COMPILE_CACHE"):
        return Path(os.environ["APERTUS_COMPILE_CACHE"]).expanduser().absolute()
    torch_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if torch_dir and os.path.abspath(torch_dir) != os.path.abspath(default_cache_dir()):
        return Path(torch_dir).absolute()
    return cache_root() / "inductor"


def _compile_cached(warm_up) -> dict:
    """Run warm_up (which compiles) with inductor's cache dir set to compile_cache_dir() (torch's own setting comes
    back after); its seconds, the cache folder, the graphs found in and missing from the FX graph cache (an AOTAutograd
    cache hit loads its graph from there too), and a message."""
    import time

    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    path = compile_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"engine: cannot create the compile cache {path} ({e.strerror}); set APERTUS_COMPILE_CACHE "
                      "to a writable folder") from e
    def looked_up():  # counters["inductor"] is looked up each time: inductor's pattern matcher swaps it for a copy
        return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]

    (hits, misses), start = looked_up(), time.perf_counter()
    with temporary_cache_dir(str(path)):
        warm_up()
    seconds = time.perf_counter() - start
    hits, misses = (after - before for after, before in zip(looked_up(), (hits, misses), strict=True))
    where = f"~/{path.relative_to(Path.home())}" if path.is_relative_to(Path.home()) else str(path)
    if not inductor_config.fx_graph_cache:
        how = "not cached: inductor's FX graph cache is off (TORCHINDUCTOR_FX_GRAPH_CACHE=0)"
    elif not hits and not misses:
        how = "no new graphs: another compiled engine in this process has them"
    elif not misses:
        how = f"{hits} graphs from cache {where}"
    elif not hits:
        how = f"cold cache: {misses} graphs compiled into {where}"
    else:
        how = f"{hits} of {hits + misses} graphs from cache {where}"
    return dict(seconds=seconds, cache_dir=path, cache_hits=hits, cache_misses=misses,
                message=f"compiled in {seconds:.1f} s ({how})")


def print_start_info(engine: Engine, prog: str) -> None:
    """What start-up spent its time on, a line each on stderr ("PROG: quantized to int8 in ... s, kept in ...",
    "PROG: compiled in ... s (...)"), for `apertus generate`, `chat` and `serve`; nothing for a plain start. (The
    engine itself only logs them, at INFO.)"""
    for line in engine.start_info:
        print(f"{prog}: {line}", file=sys.stderr, flush=True)


class Engine:
    """`Engine(checkpoint_dir | preset | model, tokenizer=None, dtype=None, ...)`.

    dtype None: bf16 on GPU, else the checkpoint's own (fp32 or bf16). cache_gb: memory for keys and values.
    prefix_caching: reuse the cached pages of prompts that start alike (see above); the same outputs, up to the float
    rounding that batching gives too.
    quantize="int8" | "int4": weight-only int8 (per output channel) or int4 (groups of 32 inputs) linears (CPU; faster
    single-stream decoding, slower prefill and large batches; see infer/quant.py). A checkpoint's quantized layers are
    kept in a file of the user cache (quant.cache_file(); APERTUS_QUANT_CACHE=off keeps none), so a later start maps
    them instead of quantizing again.
    output_filter: a factory of streaming text filters (`lambda: PIIFilter()`), one per request handle; off by
    default.
    compile=True: every step runs through torch.compile (a few graphs, compiled at start: 20-45 s for the tiny model
    on 2 cores); worth it for a server or a long job: on CPU a decoding step takes a half to a third of the eager time
    (bench/engine.py). Inductor's caches live in compile_cache_dir(), so a later start of the same shapes, in any
    process, loads the graphs (a quarter of the time: dynamo still traces); compile_info says how long it took.
    """

    def __init__(self, model_or_path, tokenizer=None, dtype: torch.dtype | str | None = None, device=None,
                 cache_gb: float = 2.0, max_batch: int = 64, prefill_chunk: int = 2048, max_queue: int = 1024,
                 page_size: int = 16, quantize: str | None = None, output_filter=None, compile: bool = False,
                 prefix_caching: bool = True):
        from ..checkpoint import load_model, parse_dtype, resolve_checkpoint_dir

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = parse_dtype(dtype)
        model_dir = None
        if isinstance(model_or_path, torch.nn.Module):
            model = model_or_path.to(device=device, dtype=dtype) if dtype else model_or_path.to(device)
        else:
            model_or_path = resolve_checkpoint_dir(model_or_path, allow_preset=True)  # a hub id: its local snapshot
            model_dir = Path(model_or_path) if Path(model_or_path).is_dir() else None
            if dtype is None:
                dtype = torch.bfloat16 if device.type == "cuda" or (
                    model_dir and _checkpoint_dtype(model_dir) == torch.bfloat16) else torch.float32
            model = load_model(model_or_path, dtype=dtype, device=device)
        self.start_info: list[str] = []  # what start-up did that took time: quantizing, compiling (print_start_info)
        if quantize is not None:
            from .quant import MODES, cache_file, quantize_cached, quantize_weights

            if quantize not in MODES or device.type != "cpu":
                raise ValueError(f"engine: quantize={quantize!r} is not supported ({' or '.join(MODES)} on CPU only)")
            cache = cache_file(model_dir, quantize, dtype) if model_dir is not None else None
            if cache is None:
                quantize_weights(model, quantize)
            else:
                self.start_info.append(quantize_cached(model, quantize, cache))
                log.info("engine: %s", self.start_info[-1])
        self.model, self.config, self.device = model.eval(), model.config, device
        self.output_filter = output_filter  # () -> object with feed(text) / flush(), e.g. compliance.PIIFilter
        self.tokenizer = _load_tokenizer(tokenizer, model_dir)
        gen = {}
        if model_dir is not None and (model_dir / "generation_config.json").exists():
            import json

            gen = json.loads((model_dir / "generation_config.json").read_text())
        self.defaults = defaults_from_generation_config(gen, self.config.eos_token_id)
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk), ("max_queue", max_queue),
                            ("page_size", page_size), ("cache_gb", cache_gb)):
            if value <= 0:
                raise ValueError(f"engine: {name} = {value} must be positive")
        self.max_batch, self.prefill_chunk, self.max_queue = max_batch, prefill_chunk, max_queue
        # Packed prompt chunks waste attention across requests; cap a pack's keys so that the waste stays near a
        # quarter of the useful matmul work: keys * 4*heads*head_dim*layers <= 0.25 * 2*(weights in the layers).
        cfg = self.config
        layer_weights = cfg.num_params(embeddings=False) - cfg.vocab_size * cfg.hidden_size
        self.pack_keys = max(256, layer_weights // (8 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers))
        # The cache never needs more than max_batch full contexts; within that, the budget decides.
        kv_dtype = model.model.norm.weight.dtype
        per_token = PagedKVCache.bytes_per_token(self.config, kv_dtype)
        tokens = min(int(cache_gb * 2**30) // per_token, max_batch * self.config.max_position_embeddings)
        if tokens < page_size:
            raise ValueError(f"engine: cache_gb = {cache_gb} holds {tokens} tokens ({per_token:,} bytes each); "
                             "raise it")
        self.cache = PagedKVCache(self.config, tokens // page_size, page_size, kv_dtype, device, prefix_caching)
        self.grammars = Grammars(self.tokenizer, self.config.vocab_size, self.config.eos_token_id)
        self.stats = {"steps": 0, "forwards": 0, "prefill_tokens": 0, "decode_tokens": 0, "preemptions": 0,
                      "prefix_queried_tokens": 0, "prefix_hit_tokens": 0}
        self._lock = threading.Condition()
        self._step_lock = threading.Lock()  # one step at a time, by the engine thread or a generate() caller
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self._next_id = 0
        self._compiled = None  # the model's hidden_states through torch.compile (compile=True)
        self._head = self.model.lm_head  # the output layer, through torch.compile too when compile=True
        self.compile_info: dict | None = None  # compile=True: the warm-up's seconds and cache hits (_compile_cached)
        if compile:
            if _compiled_engines:
                log.warning("engine: %d other compiled engine(s) open in this process; dynamo checks all their graphs "
                            "at every step and stops compiling past torch._dynamo.config.recompile_limit",
                            len(_compiled_engines))
            self.model.inv_freq(device)  # computed before tracing, not a guard of the graphs
            # the output layer too: decoding one sequence on CPU, its product is one of model.Linear's weight-bound
            # loops (131,072 rows of the output layer are a fifth of the weights a step reads at 1B parameters)
            self._compiled = torch.compile(self.model.hidden_states, dynamic=True)
            self._head = torch.compile(self.model.lm_head, dynamic=True)
            self.compile_info = _compile_cached(self._warm_up)
            self.start_info.append(self.compile_info["message"])
            log.info("engine: %s", self.compile_info["message"])
            _compiled_engines.add(id(self))

    def _warm_up(self):
        """Compile every graph a step can need before the first request: decoding one row and several, a prompt
        alone from its start, packed prompts, and a prompt continued from its cached part (chunked prefill). The
        sizes avoid coincidences (a batch of 2 with 2 key heads would compile a graph valid only for batch == heads)."""
        chunk, self.prefill_chunk = self.prefill_chunk, 8
        try:
            warm = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
            self.generate([[0] * 5, [0] * 11, [0] * 3], warm)
            self.generate([[0] * 7], warm)
        finally:
            self.prefill_chunk = chunk
            self.stats.update(dict.fromkeys(self.stats, 0))  # /metrics counts served requests only

    # --- public API ------------------------------------------------------------------------------------------------

    @property
    def max_context(self) -> int:
        """Longest prompt + output one request may have: the model's context, or the cache if it is smaller."""
        return min(self.config.max_position_embeddings, self.cache.capacity)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of text; bos=False for text that already carries <s> (a rendered chat)."""
        if self.tokenizer is None:
            raise ValueError("engine: this model has no tokenizer.json; pass token ids or a tokenizer")
        return self.tokenizer.encode(text, bos=bos)

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None, on_event=None,
               block: bool = False, background: bool = True) -> Request:
        """Queue a request (text is tokenized with BOS, ids are used as they are) and return its handle at once.

        Raises ValueError for a bad request before any compute (empty prompt, ids outside the vocabulary, prompt +
        max_tokens beyond the context or the cache budget) and EngineBusy when the queue is full (unless block).
        `on_event(delta)` is called from the engine thread for every Delta (e.g. to hand it to an asyncio loop with
        `loop.call_soon_threadsafe`); the handle can also be iterated. background=False queues it without starting
        the engine thread: the caller then runs the steps itself (`generate` does).
        """
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        params = (params or SamplingParams()).resolved(self.defaults)
        if not ids:
            raise ValueError("engine: empty prompt")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise ValueError(f"engine: prompt token ids must be in [0, {self.config.vocab_size})")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("engine: stop strings need a tokenizer")
        matcher = self.grammars.matcher(params) if params.constrained else None
        limit = self.max_context
        if params.max_tokens is None:
            if len(ids) >= limit:
                raise ValueError(f"engine: prompt of {len(ids):,} tokens leaves no room in the context of {limit:,}")
            params.max_tokens = limit - len(ids)
        total = len(ids) + params.max_tokens
        if total > self.config.max_position_embeddings:
            raise ValueError(f"engine: prompt ({len(ids):,} tokens) + max_tokens ({params.max_tokens:,}) = "
                             f"{total:,} exceeds the model's context of {self.config.max_position_embeddings:,}")
        if total > self.cache.capacity:
            raise ValueError(f"engine: prompt ({len(ids):,} tokens) + max_tokens ({params.max_tokens:,}) = "
                             f"{total:,} exceeds the KV-cache budget of {self.cache.capacity:,} tokens; "
                             "raise cache_gb or lower max_tokens")
        with self._lock:
            if self._closed:
                raise RuntimeError("engine: closed")
            while len(self._waiting) >= self.max_queue:
                if not block:
                    raise EngineBusy(f"engine: {len(self._waiting)} requests already queued")
                self._lock.wait()
            self._next_id += 1
            handle = Request(f"req-{self._next_id}", ids, params, cancel=lambda: self._cancel(seq),
                             on_event=on_event, output_filter=self.output_filter)
            seq = Sequence(handle)
            seq.matcher = matcher
            self._waiting.append(seq)
            if background:
                self._start()
            self._lock.notify_all()
        return handle

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None) -> list[Request]:
        """Run prompts (texts or id lists) together to completion; returns the finished handles in order.

        The steps run in the calling thread (taking turns with the engine thread if a server also drives this engine):
        the caller's OpenMP pool does the math, instead of a second pool while the caller's spins idle.
        """
        many = params if isinstance(params, list) else [params] * len(prompts)
        if len(many) != len(prompts):
            raise ValueError(f"engine: {len(prompts)} prompts but {len(many)} sampling params")
        handles = []
        try:
            for p, sp in zip(prompts, many, strict=True):
                while True:
                    try:
                        handles.append(self.submit(p, sp, background=False))
                        break
                    except EngineBusy:  # the queue drains as we step
                        self._step_here()
            while not all(h.finished for h in handles):
                self._step_here()
            return [h.result() for h in handles]
        except BaseException:
            for h in handles:
                h.cancel()
            raise

    def close(self):
        with self._lock:
            self._closed = True
            pending = list(self._waiting) + list(self._running)
            self._lock.notify_all()
        for seq in pending:
            self._cancel(seq)
        if self._thread is not None:
            self._thread.join()
        if self._compiled is not None:
            self._compiled, self._head = None, self.model.lm_head
            _compiled_engines.discard(id(self))
            if not _compiled_engines:  # the last compiled engine takes the graphs (and what they hold) with it
                torch._dynamo.reset()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- scheduling (under the lock) -------------------------------------------------------------------------------

    def _start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="apertus-engine", daemon=True)
            self._thread.start()

    def _cancel(self, seq: Sequence):
        with self._lock:
            if seq.finished:
                return
            if seq in self._waiting:
                self._waiting.remove(seq)
            delta = self._finish(seq, "cancelled")
        self._dispatch([(seq, delta)])

    def _finish(self, seq: Sequence, reason: str) -> Delta:
        """Mark done and free its cache pages (caller holds the lock); returns the last Delta to dispatch."""
        seq.finish_reason = reason
        if seq in self._running:
            self._running.remove(seq)
        self.cache.release(seq.pages)
        seq.pages = []
        self._lock.notify_all()
        return Delta("", [], finish_reason=reason)

    def _preempt(self, seq: Sequence):
        self.cache.release(seq.pages)
        seq.pages = []
        seq.n_cached = seq.n_registered = 0
        self._running.remove(seq)
        self._waiting.appendleft(seq)
        self.stats["preemptions"] += 1

    def _admit(self):
        free = self.cache.n_free
        while self._waiting and len(self._running) < self.max_batch:
            need = self.cache.pages_for(len(self._waiting[0].tokens) + 1)
            if need > free and self._running:  # wait for room (FIFO: nobody overtakes); alone, it always fits
                break
            free -= need
            self._running.append(self._waiting.popleft())
        self._lock.notify_all()  # room in the queue for blocked submitters

    def _plan(self):
        """Rows of this step, (request, tokens to feed, its page list), for decoding requests and prompt chunks."""
        decode, prefill, budget = [], [], self.prefill_chunk
        claimed: set[bytes] = set()  # keys of the pages this step's prompt chunks compute
        for seq in list(self._running):
            if seq not in self._running:  # preempted below for an older request
                continue
            if len(seq.tokens) - seq.n_cached > 1 and not self._match_prefix(seq, claimed):
                continue
            pending = len(seq.tokens) - seq.n_cached
            n = 1 if pending == 1 else min(pending, budget)
            if n == 0:
                continue
            while not self.cache.grow(seq.pages, seq.n_cached + n):
                self._preempt(self._running[-1])  # the youngest makes room (possibly seq itself)
                if seq not in self._running:
                    break
            else:  # the page list goes along: a cancel during the forward swaps seq.pages, not this list
                (decode if pending == 1 else prefill).append((seq, n, seq.pages))
                budget -= n if pending > 1 else 0
                self._count_prefix(seq)
                if pending > 1 and self.cache.prefix_caching:
                    P = self.cache.page_size
                    end = (seq.n_cached + n) // P
                    claimed.update(self.cache.hashes(seq.tokens, seq.keys, end)[seq.n_cached // P:end])
        return decode, prefill

    def _match_prefix(self, seq: Sequence, claimed: set[bytes]) -> bool:
        """Extend a request that has computed nothing past its full pages with the cached pages that follow. False
        when its next page is computed in this step by an older request: it waits a step and takes that from the
        cache. A match stops one token short of the end: the last token's forward gives the next token."""
        P = self.cache.page_size
        if not self.cache.prefix_caching or len(seq.pages) * P != seq.n_cached:
            return True
        limit = (len(seq.tokens) - 1) // P
        keys = self.cache.hashes(seq.tokens, seq.keys, limit)[:limit]
        seq.n_cached += P * self.cache.match(seq.pages, keys)
        return len(seq.pages) == len(keys) or keys[len(seq.pages)] not in claimed

    def _count_prefix(self, seq: Sequence):
        """The first time a request is planned: its prompt tokens looked up and found in the prefix cache."""
        if not seq.counted:
            seq.counted = True
            seq.handle.cached_tokens = min(seq.n_cached, seq.n_prompt)
            self.stats["prefix_queried_tokens"] += seq.n_prompt
            self.stats["prefix_hit_tokens"] += seq.handle.cached_tokens

    def _register(self, seq: Sequence):
        """Offer the pages a forward has just filled to the prefix cache."""
        full = seq.n_cached // self.cache.page_size
        if self.cache.prefix_caching and full > seq.n_registered:
            keys = self.cache.hashes(seq.tokens, seq.keys, full)
            self.cache.register(seq.pages[seq.n_registered:full], keys[seq.n_registered:full])
            seq.n_registered = full

    # --- the engine thread -----------------------------------------------------------------------------------------

    def _loop(self):
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not self._running:
                    self._lock.wait()
                if self._closed:
                    return
            self._step_here()

    def _step_here(self):
        """One step in the calling thread; a failing step fails its requests and the engine keeps serving."""
        with self._step_lock:
            try:
                self._step()
            except Exception as e:
                log.exception("engine step failed")
                with self._lock:
                    out = []
                    for seq in list(self._running):
                        seq.error = e
                        out.append((seq, self._finish(seq, "error")))
                self._dispatch(out)

    @torch.inference_mode()
    def _step(self):
        with self._lock:
            self._admit()
            decode, prefill = self._plan()
        groups = [(decode, True)] if decode else []
        groups += [(pack, False) for pack in _packs(prefill, self.pack_keys)]
        self.stats["steps"] += 1
        rows, hidden = [], []
        for group, decode in groups:
            h = self._forward(group, decode)
            for (seq, n, _), hb in zip(group, h, strict=True):
                if seq.n_cached + n == len(seq.tokens):  # fed everything it has: its next token is due
                    rows.append(seq)
                    hidden.append(hb)
        sampled = None
        if rows:
            logits = self._head(torch.stack(hidden))
            params = [r.params for r in rows]
            for r in rows:
                if r.params.penalized and r.out_counts is None:
                    self._init_penalty_state(r)
            masks = fill_masks([r.matcher for r in rows], logits.shape[-1], logits.device)
            sampled = sample(logits, params, [r.gen for r in rows], [r.prompt_seen for r in rows],
                             [r.out_counts for r in rows], masks)
        out = []
        with self._lock:
            for group, _ in groups:
                for seq, n, _ in group:
                    if not seq.finished and seq in self._running:
                        seq.n_cached += n
                        self._register(seq)
            if sampled is not None:
                tokens, lps, top_ids, top_lps = (x.tolist() if x is not None else None for x in sampled)
                for b, seq in enumerate(rows):
                    if seq.finished or seq not in self._running:  # cancelled during the forward
                        continue
                    top = list(zip(top_ids[b], top_lps[b], strict=True)) if top_ids is not None else None
                    out.append((seq, self._accept(seq, tokens[b], lps[b] if lps else None, top)))
        self._dispatch(out)

    def _forward(self, group, decode: bool) -> torch.Tensor:
        """One forward of the rows' next tokens through the cache; the final hidden state of each row's last token.
        Decoding rows go as a (B, 1) batch; prompt chunks are packed into one row (no padding)."""
        feeds, tables, starts = [n for _, n, _ in group], [p for _, _, p in group], [r.n_cached for r, _, _ in group]
        ids = [t for r, n, _ in group for t in r.tokens[r.n_cached:r.n_cached + n]]
        if decode:
            input_ids = torch.tensor(ids, device=self.device)[:, None]
            view, positions, mask = self.cache.decode_view(tables, starts)
        else:
            input_ids = torch.tensor(ids, device=self.device)[None]
            view, positions, mask = self.cache.prefill_view(tables, starts, feeds)
        forward = self.model.hidden_states
        if self._compiled is not None:  # sizes are symbols of the graphs, never specialised to this step's
            forward = self._compiled
            dims = [(input_ids, 1 - decode), (positions, 1 - decode), (view.write, 0), (view.read, 0)]
            for t, d in dims + ([(mask, 0 if decode else 2), (mask, 3)] if mask is not None else []):
                torch._dynamo.maybe_mark_dynamic(t, d)
        h = forward(input_ids, positions, mask, view)
        self.stats["forwards"] += 1
        self.stats["decode_tokens" if decode else "prefill_tokens"] += len(ids)
        if decode:
            return h[:, 0]
        return h[0, torch.cumsum(torch.tensor(feeds, device=self.device), 0) - 1]

    def _init_penalty_state(self, seq: Sequence):
        V = self.config.vocab_size
        seq.prompt_seen = torch.zeros(V, dtype=torch.bool, device=self.device)
        seq.prompt_seen[torch.tensor(seq.tokens[:seq.n_prompt], device=self.device)] = True
        seq.out_counts = torch.zeros(V, device=self.device)
        for t in seq.output_ids:
            seq.out_counts[t] += 1

    def _accept(self, seq: Sequence, token: int, logprob, top) -> Delta:
        """Append a sampled token, stream its text, and finish the request if a stop condition holds."""
        p = seq.params
        seq.tokens.append(token)
        if p.top_logprobs:
            top = top[: p.top_logprobs]
        if seq.out_counts is not None:
            seq.out_counts[token] += 1
        finish = None
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            log.warning("%s: token %d does not fit its grammar: %s", seq.handle.id, token, seq.matcher.get_error())
        if token in p.stop_token_ids and not p.ignore_eos:
            finish, seq.stop_reason = "stop", token
        elif self.tokenizer is not None:
            if seq.decoder is None:
                from tokenizers.decoders import DecodeStream

                seq.decoder = DecodeStream(skip_special_tokens=p.skip_special_tokens)
            piece = seq.decoder.step(self.tokenizer.inner, token)
            if piece:
                before = len(seq.text)
                seq.text += piece
                for s in p.stop_strings:
                    at = seq.text.find(s, max(0, before - len(s) + 1))
                    if at >= 0:
                        seq.text, finish, seq.stop_reason = seq.text[:at], "stop", s
                        break
        if finish is None and seq.matcher is not None and seq.matcher.is_stopped():  # the grammar is complete
            finish = "stop"
        if finish is None and len(seq.tokens) - seq.n_prompt >= p.max_tokens:
            finish = "length"
        if finish is not None and not isinstance(seq.stop_reason, str):
            self._flush_text(seq)
        hold = max((len(s) for s in p.stop_strings), default=1) - 1 if finish is None else 0
        upto = max(seq.emitted, len(seq.text) - hold)
        text, seq.emitted = seq.text[seq.emitted:upto], upto
        delta = Delta(text, [token], [logprob] if p.logprobs else None, [top] if p.top_logprobs else None)
        if finish is not None:
            self._finish(seq, finish)
            delta.finish_reason = finish
        return delta

    def _flush_text(self, seq: Sequence):
        """At the end, bytes the stream still holds (an unfinished UTF-8 character) are decoded as the tokenizer
        would decode the whole output, so the streamed text equals tokenizer.decode(output ids)."""
        if self.tokenizer is None:
            return
        ids = seq.output_ids[:-1] if isinstance(seq.stop_reason, int) else seq.output_ids
        full = self.tokenizer.decode(ids, skip_special_tokens=seq.params.skip_special_tokens)
        if full.startswith(seq.text):
            seq.text = full

    def _dispatch(self, out):
        """Hand the pieces to their handles (outside the lock: a handle's on_event may cancel, which takes it)."""
        for seq, delta in out:
            seq.handle.deliver(delta, stop_reason=seq.stop_reason, error=seq.error)
