"""The L1 page pool: page ids (allocation with exact accounting) and the KV tensors."""

from __future__ import annotations

import ctypes
import math
import mmap
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


def zeros_huge(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor backed by transparent huge pages where Linux grants them
    (madvise before the first touch; a no-op elsewhere). Its memory is an anonymous mapping:
    zero pages from the OS, none resident until written, so a pool sized to its memory
    budget costs nothing at start (zeroing 14 GB took seconds of system time a server).

    NOTE: one layer of the pool is a 13 KB run in every page, a page-major stride apart, so
    decode reads touch thousands of 4 KB pages a layer; on 2 MB pages the same attention
    at 16 x 700 tokens ran ~10% faster here (17.4 vs 19.5 ms a step, three runs each)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if sys.platform != "linux" or nbytes < 4 * HUGE_PAGE:
        return torch.zeros(shape, dtype=dtype)
    with warnings.catch_warnings():  # the mapping is writable; torch warns of any buffer
        warnings.simplefilter("ignore")
        buf = torch.frombuffer(mmap.mmap(-1, nbytes + HUGE_PAGE), dtype=torch.uint8)
    off = -buf.data_ptr() % HUGE_PAGE
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(
            ctypes.c_void_p(buf.data_ptr() + off),
            ctypes.c_size_t(nbytes // HUGE_PAGE * HUGE_PAGE),
            MADV_HUGEPAGE,
        )
    except (OSError, AttributeError):
        pass  # advice only
    return buf[off : off + nbytes].view(dtype).view(shape)  # zero already


class OutOfPagesError(RuntimeError):
    pass


class PagePool:
    """Page ids 0..num_pages-1 of one tier. Knows nothing of requests or tokens."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        # NOTE: a stack, so recently freed (cache-warm) pages are reused first.
        self._free = list(range(num_pages - 1, -1, -1))
        self._used = bytearray(num_pages)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        """Take n pages; raises OutOfPagesError (taking none) when fewer are free."""
        if n < 0:
            raise ValueError("cannot allocate a negative number of pages")
        if n > len(self._free):
            raise OutOfPagesError(f"need {n} pages, {len(self._free)} free of {self.num_pages}")
        pages = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        for p in pages:
            self._used[p] = 1
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Return pages; freeing a page that is not allocated is a bug and raises."""
        pages = list(pages)
        for p in pages:
            if not 0 <= p < self.num_pages or not self._used[p]:
                raise ValueError(f"page {p} is not allocated")
            self._used[p] = 0
        self._free.extend(pages)


def alloc_evicting(
    pool: PagePool, n: int, evict: Callable[[int], list[int]] | None
) -> list[int] | None:
    """Take n pages, evicting cached ones (evict(k) releases at least k if it can) when
    fewer are free; None when even that leaves too few."""
    short = n - pool.num_free
    if short > 0 and evict is not None:
        pool.free(evict(short))
    if n > pool.num_free:
        return None
    return pool.alloc(n)


class LayerKV(NamedTuple):
    """One layer's views of the pool."""

    k: torch.Tensor  # [pages, page_size, kv_heads, head_dim], each page contiguous
    v: torch.Tensor
    kmin: torch.Tensor  # [pages, kv_heads, head_dim]: the page's key summary (min, max over
    kmax: torch.Tensor  # its tokens, per channel), read by sparse decode to choose pages
    layer_id: int


class KVCache:
    """K and V of every layer, page-major: [pages, layers, 2, page_size + 1, kv_heads, dim].

    NOTE: a page's K and V of every layer are one contiguous block (`page(p)`), so a page
    moves between workers or tiers as one buffer, with no gather; one layer's K (or V) is a
    strided view [pages, page_size, kv_heads, head_dim] whose pages are each contiguous.
    Row page_size of a page's K holds the channel-wise min of its keys, of its V their max
    (the page summary of sparse attention), so a summary goes wherever its page goes.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        pin_memory: bool = False,
    ) -> None:
        shape = (num_pages, num_layers, 2, page_size + 1, num_kv_heads, head_dim)
        if torch.device(device).type == "cpu" and not pin_memory:
            data = zeros_huge(shape, dtype)
        else:
            data = torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin_memory)
        self._view(data, page_size)

    def _view(self, data: torch.Tensor, page_size: int) -> None:
        self.page_size, self.data = page_size, data
        ps, d = page_size, data
        self.layers = [
            LayerKV(d[:, i, 0, :ps], d[:, i, 1, :ps], d[:, i, 0, ps], d[:, i, 1, ps], i)
            for i in range(data.shape[1])
        ]

    def rows(self, start: int, stop: int) -> KVCache:
        """Pages start..stop-1 of this pool as a pool of their own (same memory): on the CPU
        the L2 tier is the tail of the pool the kernels read, so a page demoted to L2 is
        still addressable (as start + its L2 id)."""
        view = KVCache.__new__(KVCache)
        view._view(self.data[start:stop], self.page_size)
        return view

    def page(self, page: int) -> torch.Tensor:
        """Every layer's K and V of one page, with its summaries: a contiguous block
        [layers, 2, page_size + 1, heads, dim]."""
        return self.data[page]

    @property
    def bytes_per_page(self) -> int:
        return self.data[0].numel() * self.data.element_size()

    def like(self, num_pages: int, device: torch.device | str, pin_memory: bool) -> KVCache:
        """An empty pool of the same page shape (another tier)."""
        _, layers, _, _, heads, dim = self.data.shape
        return KVCache(
            layers, num_pages, self.page_size, heads, dim, self.data.dtype, device, pin_memory
        )


class Segments(NamedTuple):
    """The radix segments of a decode batch's sequences: the coarse level of select_pages.

    ends [B, S] int64: the page index where each segment of a sequence ends (its first
    segment starts at page 0; entries past counts[b] are ignored); counts [B] int64; sums
    [B, S, layers, 2, kv_heads, D]: per layer, the min of the segment's pages' kmin (index 0)
    and the max of their kmax (index 1), as segment_summaries computes them."""

    ends: torch.Tensor
    counts: torch.Tensor
    sums: torch.Tensor
