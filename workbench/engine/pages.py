"""The paged KV cache: one pool of fixed-size pages, reference-counted, with a prefix cache.

Keys and values of every layer live in two arrays of ``n_pages`` pages of `PAGE_SIZE` positions.
A sequence holds a page table (a list of page ids); position p is row ``p % PAGE_SIZE`` of page
``table[p // PAGE_SIZE]``. A full page is keyed by a hash chain of its token ids (the hash of the
page before it and its own ids), so two prompts that start alike share the pages of their common
prefix: each page counts its holders, and a page nobody holds keeps its contents (and its key)
until it is needed for something else, least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from workbench.errors import UserError

PAGE_SIZE = 16  # positions per page
DEFAULT_KV_CACHE_MB_CAP = 512  # the default budget never asks for more than this


def bytes_per_position(spec: Any, itemsize: int = 4) -> int:
    """Keys and values of every layer for one position, of ``itemsize`` bytes each (float32: 4)."""
    return 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * itemsize


def default_kv_cache_mb(spec: Any, max_batch: int) -> float:
    """Room for ``max_batch`` sequences of up to 2,048 positions (or the context, if shorter),
    capped at `DEFAULT_KV_CACHE_MB_CAP` MiB."""
    positions = max_batch * min(spec.context_length, 2048)
    return min(DEFAULT_KV_CACHE_MB_CAP, positions * bytes_per_position(spec) / 2**20)


def chain_hash(prev: int, tokens: Sequence[int]) -> int:
    """The key of a full page: its token ids, chained to the key of the page before it."""
    return hash((prev, tuple(tokens)))


class PagePool:
    """Pages of keys and values for all layers, handed out to sequences by page table.

    ``xp`` and ``dtype`` are the backend's array module and KV element type (a device backend
    keeps the pages on the device, in fp16 by default: twice the pages for the same budget)."""

    def __init__(
        self, spec: Any, kv_cache_mb: float, xp: Any = np, dtype: Any = np.float32
    ) -> None:
        page_bytes = bytes_per_position(spec, np.dtype(dtype).itemsize) * PAGE_SIZE
        n_pages = int(kv_cache_mb * 2**20 // page_bytes)
        if n_pages < 1:
            raise UserError(
                "user.bad_kv_cache_mb",
                f"a KV cache of {kv_cache_mb} MiB holds no page of {PAGE_SIZE} positions "
                f"({page_bytes} bytes each)",
            )
        self.n_pages = n_pages
        self.xp = xp
        shape = (spec.n_layers, n_pages, PAGE_SIZE, spec.n_kv_heads, spec.head_dim)
        # np.zeros commits memory as pages are first written: an idle budget costs nothing.
        self.k = xp.zeros(shape, dtype=dtype)  # (layer, page, PAGE_SIZE, kv_heads, hd)
        self.v = xp.zeros(shape, dtype=dtype)  # (layer, page, PAGE_SIZE, kv_heads, hd)
        self.refs = [0] * n_pages
        self.key: list[int | None] = [None] * n_pages  # hash-chain key of a full, computed page
        self.by_key: dict[int, int] = {}  # key -> page
        self._free: list[int] = list(range(n_pages - 1, -1, -1))  # unheld, no contents kept
        self._cached: OrderedDict[int, None] = OrderedDict()  # unheld, keyed; oldest first
        self.hit_tokens = 0  # prompt positions served from the prefix cache

    @property
    def available(self) -> int:
        """Pages that can be handed out now (free, or cached and evictable)."""
        return len(self._free) + len(self._cached)

    @property
    def used(self) -> int:
        """Pages held by at least one sequence."""
        return self.n_pages - self.available

    def allocate(self) -> int:
        """A page for one holder; raises IndexError when none is available."""
        if self._free:
            page = self._free.pop()
        elif self._cached:
            page, _ = self._cached.popitem(last=False)  # least recently used
            key = self.key[page]
            self.key[page] = None
            if key is not None and self.by_key.get(key) == page:
                del self.by_key[key]
        else:
            raise IndexError("no free KV page")
        self.refs[page] = 1
        return page

    def release(self, table: Sequence[int]) -> None:
        """Drop one hold on each page; unheld keyed pages stay cached, the others are freed."""
        for page in reversed(table):  # the tail of a prefix is evicted before its head
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if self.key[page] is not None:
                    self._cached[page] = None
                else:
                    self._free.append(page)

    def register(self, page: int, key: int) -> None:
        """Key a page that has just been filled, so later prompts can share it."""
        self.key[page] = key
        self.by_key.setdefault(key, page)

    def match_prefix(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """(pages, keys) of the longest run of cached full pages that ``ids`` starts with.
        At least the last id is left to compute (its logits are needed). Nothing is held:
        `hold` the pages to use them."""
        pages: list[int] = []
        keys: list[int] = []
        prev = 0
        for p in range((len(ids) - 1) // PAGE_SIZE):
            key = chain_hash(prev, ids[p * PAGE_SIZE : (p + 1) * PAGE_SIZE])
            page = self.by_key.get(key)
            if page is None or self.key[page] != key:
                break
            pages.append(page)
            keys.append(key)
            prev = key
        return pages, keys

    def cost(self, pages: Sequence[int]) -> int:
        """How many available pages holding ``pages`` would take (the unheld, cached ones)."""
        return sum(1 for p in pages if self.refs[p] == 0)

    def hold(self, pages: Sequence[int]) -> None:
        """One more hold on each (cached or held) page."""
        for page in pages:
            if self.refs[page] == 0:
                del self._cached[page]
            self.refs[page] += 1
        self.hit_tokens += len(pages) * PAGE_SIZE

    def write(self, layer: int, table: Sequence[int], start: int, k: Any, v: Any) -> None:
        """Store k, v (n, kv_heads, hd) of positions start..start+n-1 through a page table
        (an fp16 pool rounds to nearest even, as the device's kv_append)."""
        n = k.shape[0]
        pos = np.arange(start, start + n)
        pages = self.xp.asarray(np.asarray(table, dtype=np.int64)[pos // PAGE_SIZE])
        rows = self.xp.asarray(pos % PAGE_SIZE)
        self.k[layer, pages, rows] = k
        self.v[layer, pages, rows] = v

    def gather(self, layer: int, table: Sequence[int], length: int) -> tuple[Any, Any]:
        """Keys and values of positions 0..length-1, each (kv_heads, length, hd), contiguous."""
        n_pages = -(-length // PAGE_SIZE)
        idx = self.xp.asarray(np.asarray(table[:n_pages], dtype=np.int64))
        k = self.k[layer, idx].reshape(n_pages * PAGE_SIZE, *self.k.shape[3:])[:length]
        v = self.v[layer, idx].reshape(n_pages * PAGE_SIZE, *self.v.shape[3:])[:length]
        return (
            self.xp.ascontiguousarray(k.transpose(1, 0, 2)),
            self.xp.ascontiguousarray(v.transpose(1, 0, 2)),
        )
