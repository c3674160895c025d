"""Fetch on select: a running request's pages that sparse decode has not selected for
`--sparse-demote-after` steps may move to L2 when L1 runs short (before anyone is preempted),
and move back when a step selects them again and L1 has room (free pages, or cached pages of
finished requests to evict).

It needs the L2 pool to be addressable by the kernels: on the CPU L2 is the tail of the pool
they read (KVCache.rows), so a demoted page keeps its place in the request's page table as
`l2_base + its L2 id`, and a step that selects it (or a dense layer, which reads every page)
reads it in place. A request's pages at or past l2_base are its own L2 pages (not the
tree's); before its pages are released they are brought back into L1, and where L1 cannot
hold them all the end of its page table is dropped (the cache keeps the longest prefix).

The pages of a request's prompt belong to the radix tree once prefilled; to demote one, the
request first takes the deepest pages of its path back from the tree (those no other request
holds: TieredCache.give_back), and they become its own.
"""

from __future__ import annotations

import torch

from strata.cache.hierarchy import TieredCache
from strata.engine.request import Request
from strata.kv.pool import PagePool, alloc_evicting


class Offload:
    def __init__(
        self, cache: TieredCache, pool: PagePool, after: int, sink_pages: int, window_pages: int
    ) -> None:
        assert cache.l2_base is not None, "fetch on select reads L2 in place"
        self.prefix_cache, self.pool, self.after = cache, pool, after
        self.base = cache.l2_base
        self.sink, self.window = sink_pages, window_pages
        self.step = 0  # forwards seen
        self.demoted = self.fetched = 0  # pages moved, counted

    def after_forward(
        self, reqs: list[Request], selected: list[torch.Tensor | None] | None, reserve: int
    ) -> None:
        """A forward ran reqs (one chunk each); selected: per chunk, the pages sparse decode
        kept (AttentionBackend.selected). Records them and fetches selected L2 pages."""
        for j, req in enumerate(reqs):
            row = selected[j] if selected is not None else None
            self.observe(req, row.nonzero().flatten().tolist() if row is not None else None)
            self.fetch_selected(req, reserve)
        self.step += 1

    def observe(self, req: Request, touched: list[int] | None) -> None:
        """After a forward that ran req: the indices of its pages that sparse decode kept
        (None: it did not decode sparsely). New pages count as selected now."""
        sel = req.selected_at
        if touched is None and sel is None:
            return
        if sel is None:
            sel = req.selected_at = []
        sel.extend([self.step] * (len(req.pages) - len(sel)))
        for i in touched or ():
            sel[i] = self.step

    def demote(self, running: list[Request], need: int) -> int:
        """Move up to `need` stale pages of running requests to L2, least recently selected
        first; returns the L1 pages freed."""
        cutoff = self.step - 1 - self.after  # the last forward was step - 1
        stale = []
        for r, req in enumerate(running):
            sel = req.selected_at
            if sel is None or req.awaiting_kv:
                continue
            end = min(len(sel), len(req.pages)) - self.window
            for i in range(self.sink, end):
                if sel[i] <= cutoff and req.pages[i] < self.base:
                    stale.append((sel[i], r, i))
        stale.sort()
        freed = 0
        for _, r, i in stale:
            if freed >= need:
                break
            req = running[r]
            if i < req.num_shared_pages and not self._own(req, i):
                continue  # another request holds it too
            host = self.prefix_cache.copy_down([req.pages[i]])
            if host is None:
                break  # L2 is full of locked pages
            self.pool.free([req.pages[i]])
            req.pages[i] = self.base + host[0]
            req.num_demoted += 1
            self.demoted += 1
            freed += 1
        return freed

    def fetch_selected(self, req: Request, reserve: int) -> None:
        """After a step: req's L2 pages that it selected are copied back into L1 pages, free
        or taken from the cache's unlocked pages (LRU), leaving `reserve` pages free."""
        sel = req.selected_at
        if not req.num_demoted or sel is None:
            return
        wanted = [i for i, p in enumerate(req.pages) if p >= self.base and sel[i] == self.step]
        if not wanted:
            return
        pages = alloc_evicting(self.pool, len(wanted) + reserve, self.prefix_cache.evict)
        if pages is not None:
            self.pool.free(pages[len(wanted) :])
            self._fetch(req, wanted, pages[: len(wanted)])

    def restore(self, req: Request, page_size: int) -> None:
        """Before req's pages are released: its L2 pages back into L1 (evicting cached pages
        if needed); where L1 cannot hold them all, the end of its page table is dropped, so
        the cache keeps the longest prefix that fits."""
        if req.num_demoted:
            need = req.num_demoted - self.pool.num_free
            if need > 0:
                self.pool.free(self.prefix_cache.evict(need))
            while req.num_demoted > self.pool.num_free:
                page = req.pages.pop()
                if page >= self.base:
                    self.prefix_cache.host_pool.free([page - self.base])
                    req.num_demoted -= 1
                else:
                    self.pool.free([page])
            demoted = [i for i, p in enumerate(req.pages) if p >= self.base]
            self._fetch(req, demoted, self.pool.alloc(len(demoted)))
            req.num_computed = min(req.num_computed, len(req.pages) * page_size)
        req.selected_at = None

    def stats(self) -> dict[str, int]:
        return {"demoted_pages": self.demoted, "fetched_pages": self.fetched}

    # ---- internals -----------------------------------------------------------------------

    def _own(self, req: Request, i: int) -> bool:
        """Take back from the tree the deepest pages of req's path no one else holds; True
        when page i is req's own afterwards."""
        assert req.cache_node is not None
        node, taken = self.prefix_cache.give_back(req.cache_node)
        shared = req.num_shared_pages - len(taken)
        assert req.pages[shared : req.num_shared_pages] == taken
        req.cache_node, req.num_shared_pages = node, shared
        return i >= shared

    def _fetch(self, req: Request, indices: list[int], pages: list[int]) -> None:
        host = [req.pages[i] - self.base for i in indices]
        self.prefix_cache.mover.from_host(host, pages)
        self.prefix_cache.host_pool.free(host)
        for i, p in zip(indices, pages):
            req.pages[i] = p
        req.num_demoted -= len(indices)
        self.fetched += len(indices)
