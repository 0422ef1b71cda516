"""A paged KV cache preallocated from a memory budget, and the per-forward view the model's attention writes through.

Keys and values of all sequences live in one (n_kv, tokens, head_dim) tensor per layer (separate tensors, not one
stacked buffer: torch.compile then writes a step's keys in place instead of copying the buffer), handed out in pages
of `page_size` token slots, so one long request and many short ones share the same memory (no per-slot maximum length).
One extra page stays zero: rows of a decode batch shorter than the longest read it as (masked) padding keys.

Prefix caching (on unless prefix_caching=False): a full page is keyed by the hash of ALL tokens up to its end (a
chain: the previous page's hash + this page's tokens), so equal keys mean equal keys-and-values, and a request whose
prompt starts like an earlier one takes those pages instead of computing them again. Shared pages are read-only
(a request only ever writes at positions past its matched pages, and only full pages are matched, so the last,
partial page is always its own) and reference-counted. A page nobody holds any more keeps its keys while its hash is
known: it waits among the evictable pages, taken back least-recently-released first when no blank page is left;
a page held by a running request is never evicted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch


class PagedKVCache:
    def __init__(self, cfg, n_pages: int, page_size: int, dtype: torch.dtype, device, prefix_caching: bool = True):
        self.page_size, self.n_pages, self.prefix_caching = page_size, n_pages, prefix_caching
        slots = (n_pages + 1) * page_size  # + the zero page (page number n_pages)
        shape = (cfg.num_key_value_heads, slots, cfg.head_dim)
        # zeros, not empty: masked keys still multiply their (zero) values, and NaN * 0 would leak into outputs
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.dtype, self.device = dtype, torch.device(device)
        self.free_pages = list(range(n_pages - 1, -1, -1))  # blank pages; pop() hands out low pages first
        self.refs = [0] * n_pages  # requests holding each page
        self.page_hash: list[bytes | None] = [None] * n_pages  # the key of a full page whose keys are kept
        self.by_hash: dict[bytes, int] = {}  # key -> page
        self.evictable: OrderedDict[int, None] = OrderedDict()  # held by nobody, hash known; oldest first

    @staticmethod
    def bytes_per_token(cfg, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * size

    @property
    def capacity(self) -> int:
        """Tokens one sequence can hold when it has the whole cache."""
        return self.n_pages * self.page_size

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    @property
    def n_free(self) -> int:
        """Pages a request can take: blank ones and cached ones nobody holds."""
        return len(self.free_pages) + len(self.evictable)

    def grow(self, pages: list[int], n_tokens: int) -> bool:
        """Extend a sequence's page list to hold n_tokens; False (and nothing taken) when the cache is full.
        Blank pages go first; then the least recently released cached page is evicted (its key forgotten)."""
        need = self.pages_for(n_tokens) - len(pages)
        if need > self.n_free:
            return False
        for _ in range(max(need, 0)):
            if self.free_pages:
                page = self.free_pages.pop()
            else:
                page, _ = self.evictable.popitem(last=False)
                del self.by_hash[self.page_hash[page]]
                self.page_hash[page] = None
            self.refs[page] = 1
            pages.append(page)
        return True

    def release(self, pages: list[int]):
        """Give a sequence's pages back. The list itself is left alone: a forward in flight may still read it.
        Released last page first, so that a prompt's tail is evicted before the prefix other prompts share."""
        for page in reversed(pages):
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if self.page_hash[page] is None:
                    self.free_pages.append(page)
                else:
                    self.evictable[page] = None

    def hashes(self, tokens: list[int], known: list[bytes], n_pages: int) -> list[bytes]:
        """Extend `known` (the keys of the first pages of tokens) to the first n_pages full pages; returns it.
        A cryptographic hash: with a plain one, a client could craft a prompt whose key collides with another
        client's prefix and read answers computed from that client's keys and values."""
        P = self.page_size
        for i in range(len(known), min(n_pages, len(tokens) // P)):
            parent = known[i - 1] if i else b""
            known.append(hashlib.blake2b(parent + array("q", tokens[i * P:(i + 1) * P]).tobytes(),
                                         digest_size=16).digest())
        return known

    def match(self, pages: list[int], keys: list[bytes]) -> int:
        """Take the cached pages of `keys` that follow a sequence's `pages` (which must all be full, matched or
        computed): a reference each. Returns how many were taken."""
        if not self.prefix_caching:
            return 0
        taken = 0
        for key in keys[len(pages):]:
            page = self.by_hash.get(key)
            if page is None:
                break
            if self.refs[page] == 0:
                del self.evictable[page]
            self.refs[page] += 1
            pages.append(page)
            taken += 1
        return taken

    def register(self, pages: list[int], keys: list[bytes]):
        """Remember the keys of a sequence's full, computed pages (keys[i] for pages[i]). A key already cached on
        another page (two requests computed the same prefix at once) keeps that page; this one stays private."""
        if not self.prefix_caching:
            return
        for page, key in zip(pages, keys, strict=False):
            if self.page_hash[page] is None and key not in self.by_hash:
                self.page_hash[page], self.by_hash[key] = key, page

    def _table(self, page_tables: list[list[int]]) -> torch.Tensor:
        """(rows, pages) page numbers, padded with the zero page (never written)."""
        width = max(len(p) for p in page_tables)
        return torch.tensor([p + [self.n_pages] * (width - len(p)) for p in page_tables], device=self.device)

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        # additive masks in the cache dtype: SDPA on CPU runs them about twice as fast as the same mask in bool
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, -torch.inf)

    def decode_view(self, page_tables: list[list[int]], lengths: list[int]):
        """One new token for each of B rows, row b having lengths[b] tokens cached: a (B, 1) batch whose keys are
        padded to the longest row. Returns (cache view, position ids (B, 1), mask (B, 1, 1, keys) or None)."""
        dev, P = self.device, self.page_size
        table = self._table(page_tables)
        pos = torch.tensor(lengths, device=dev)[:, None]
        write = table.gather(1, pos // P) * P + pos % P
        j = torch.arange(int(pos.max()) + 1, device=dev)[None]
        read = table.gather(1, (j // P).expand(len(lengths), -1)) * P + j % P
        mask = None if len(lengths) == 1 else self._additive(j <= pos)[:, None, None]
        return StepView(self, write.flatten(), read), pos, mask

    def prefill_view(self, page_tables: list[list[int]], starts: list[int], lengths: list[int]):
        """Prompt chunks of several rows packed into ONE row (no padding): row b feeds lengths[b] tokens after its
        starts[b] cached ones, and each token sees only its own row's keys. Returns (view, position ids (1, T),
        mask (1, 1, T, keys) or None for one row from the start, which the model runs as plain causal attention)."""
        dev, P = self.device, self.page_size
        table = self._table(page_tables)
        rows = torch.arange(len(lengths), device=dev)
        start, length = torch.tensor(starts, device=dev), torch.tensor(lengths, device=dev)
        q_row = rows.repeat_interleave(length)
        q_pos = start[q_row] + torch.arange(len(q_row), device=dev) - (torch.cumsum(length, 0) - length)[q_row]
        k_row = rows.repeat_interleave(start + length)
        k_pos = torch.arange(len(k_row), device=dev) - (torch.cumsum(start + length, 0) - start - length)[k_row]
        write = table[q_row, q_pos // P] * P + q_pos % P
        read = (table[k_row, k_pos // P] * P + k_pos % P)[None]
        if len(lengths) == 1 and starts[0] == 0:
            mask = None
        elif len(lengths) == 1:  # only the last block of keys is causal; the cached ones are all visible
            mask = torch.zeros(lengths[0], len(k_row), dtype=self.dtype, device=dev)
            mask[:, starts[0]:] = self._additive(torch.ones(lengths[0], lengths[0], dtype=torch.bool,
                                                            device=dev).tril())
            mask = mask[None, None]
        else:
            mask = self._additive((q_row[:, None] == k_row[None]) & (k_pos[None] <= q_pos[:, None]))[None, None]
        return StepView(self, write, read), q_pos[None], mask


class StepView:
    """What the model's attention calls: `k, v = cache.update(layer_idx, k, v)` with k, v (B, n_kv, T, head_dim)."""

    def __init__(self, cache: PagedKVCache, write: torch.Tensor, read: torch.Tensor):
        self.cache, self.write, self.shape = cache, write, read.shape
        # rows to gather from a layer's (n_kv·slots, D) view, in (B, n_kv, n_keys) order: the keys come out as one
        # contiguous (B, n_kv, n_keys, D) tensor, which the attention matmuls and SDPA read without another copy
        n_kv, slots, _ = cache.k[0].shape
        heads = torch.arange(n_kv, device=read.device)[None, :, None] * slots
        self.read = (heads + read[:, None, :]).flatten()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        K, V = self.cache.k[layer], self.cache.v[layer]  # (n_kv, slots, D)
        n_kv, D = k.shape[1], k.shape[3]
        # (B, n_kv, T, D) -> (n_kv, B·T, D); under torch.compile an in-place scatter
        K[:, self.write] = k.transpose(0, 1).reshape(n_kv, -1, D)
        V[:, self.write] = v.transpose(0, 1).reshape(n_kv, -1, D)
        # index_select copies whole rows (several times faster than advanced indexing on CPU)
        shape = (self.shape[0], n_kv, self.shape[1], D)
        return (K.view(-1, D).index_select(0, self.read).view(shape),
                V.view(-1, D).index_select(0, self.read).view(shape))
