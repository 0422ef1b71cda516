"""A paged KV cache preallocated from a memory budget, and the per-forward view the model's attention writes through.

Keys and values of all sequences live in one (tokens, n_kv, head_dim) buffer per layer, handed out in pages of
`page_size` token slots, so one long request and many short ones share the same memory (no per-slot maximum length).
The last page is a scratch page: padding positions of a batch write there and are never read as real keys.
"""

from __future__ import annotations

import torch


class PagedKVCache:
    def __init__(self, cfg, n_pages: int, page_size: int, dtype: torch.dtype, device):
        self.page_size, self.n_pages = page_size, n_pages
        slots = (n_pages + 1) * page_size  # + the scratch page
        shape = (cfg.num_hidden_layers, slots, cfg.num_key_value_heads, cfg.head_dim)
        # zeros, not empty: masked keys still multiply their (zero) values, and NaN * 0 would leak into outputs
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.scratch = n_pages * page_size
        self.free_pages = list(range(n_pages - 1, -1, -1))  # pop() hands out low pages first

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

    def grow(self, pages: list[int], n_tokens: int) -> bool:
        """Extend a sequence's page list to hold n_tokens; False (and nothing taken) when the cache is full."""
        need = self.pages_for(n_tokens) - len(pages)
        if need > len(self.free_pages):
            return False
        pages.extend(self.free_pages.pop() for _ in range(max(need, 0)))
        return True

    def release(self, pages: list[int]):
        self.free_pages.extend(reversed(pages))
        pages.clear()

    def view(self, page_tables: list[list[int]], starts: list[int], lengths: list[int], T: int) -> StepView:
        """The cache as seen by one forward over B rows: row b has `starts[b]` tokens cached and feeds `lengths[b]`
        new ones (padded to T). Returns the view to pass as `cache=` and the matching position ids and mask."""
        dev, P = self.k.device, self.page_size
        B = len(page_tables)
        width = max(len(p) for p in page_tables)
        table = torch.tensor([p + [self.n_pages] * (width - len(p)) for p in page_tables], device=dev)
        start = torch.tensor(starts, device=dev)[:, None]
        length = torch.tensor(lengths, device=dev)[:, None]
        i = torch.arange(T, device=dev)[None]
        positions = start + i  # (B, T); padding continues the count and is masked out below
        valid = i < length
        page = table.gather(1, torch.where(valid, positions // P, 0))
        write = torch.where(valid, page * P + positions % P, self.scratch + i % P)
        n_keys = int((start + length).max())
        j = torch.arange(n_keys, device=dev)[None]
        read = table.gather(1, (j // P).expand(B, -1)) * P + j % P  # pages past a row's end are scratch
        # (B, 1, T, n_keys), causal within each row, additive in the cache dtype (SDPA on CPU runs that about twice as
        # fast as bool). Keys before the shortest row's start are visible to all: only the columns after it are built.
        mask = torch.zeros(B, 1, T, n_keys, dtype=self.k.dtype, device=dev)
        lo = min(starts)
        mask[:, 0, :, lo:] = torch.where(j[:, None, lo:] <= positions[:, :, None], 0.0, float("-inf"))
        return StepView(self, write.flatten(), read, B, T), positions, mask


class StepView:
    """What the model's attention calls: `k, v = cache.update(layer_idx, k, v)` with k, v (B, n_kv, T, head_dim)."""

    def __init__(self, cache: PagedKVCache, write: torch.Tensor, read: torch.Tensor, B: int, T: int):
        self.cache, self.write, self.read, self.B, self.T = cache, write, read, B, T

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        K, V = self.cache.k[layer], self.cache.v[layer]
        K.index_copy_(0, self.write, k.transpose(1, 2).reshape(-1, *K.shape[1:]))
        V.index_copy_(0, self.write, v.transpose(1, 2).reshape(-1, *V.shape[1:]))
        # (B, n_keys, n_kv, D) -> (B, n_kv, n_keys, D) as a strided view; SDPA reads it as is
        return K[self.read].transpose(1, 2), V[self.read].transpose(1, 2)
