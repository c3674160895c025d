"""Scheduler: continuous batching with chunked prefill, prefix-aware admission, preemption.

Each step takes every running decode token, then continues partial prefills, then admits
waiting requests (longest cached prefix first) while the token budget lasts. Pages come from
the pool; when it runs dry the radix cache is evicted first, then the newest running request
is preempted (its computed pages go to the cache, so re-admission recomputes little).

A request whose prompt KV comes from a prefill worker (split mode) is admitted by reserving
pages for its whole prompt; it computes nothing until the engine reports the KV landed, and
it is never preempted while the transfer may still write into its pages.
"""

from __future__ import annotations

from dataclasses import dataclass

from strata.engine.request import Request
from strata.kv.pool import PagePool
from strata.radix.index import CacheIndex
from strata.radix.tree import common_prefix_len


@dataclass
class ScheduledChunk:
    req: Request
    start: int  # first token of req.fill_ids computed in this step
    length: int
    sample: bool  # the chunk ends the fill, so its last logits give the next token


class Scheduler:
    def __init__(
        self,
        pool: PagePool,
        cache: CacheIndex | None,
        page_size: int,
        max_batch_tokens: int,
        max_running: int,
    ) -> None:
        self.pool, self.cache, self.page_size = pool, cache, page_size
        self.max_batch_tokens, self.max_running = max_batch_tokens, max_running
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # admitted (holding pages), oldest first
        self.fetching: list[Request] = []  # admitted remote requests the engine must start

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        # Decoding requests: the sampled token, plus any tokens jump-forward decoding forced.
        for req in list(self.running):
            if req.decoding and req in self.running and self._grow(req, req.num_fill):
                chunks.append(ScheduledChunk(req, req.num_computed, req.remaining, True))
        budget = self.max_batch_tokens - sum(c.length for c in chunks)
        for req in self.running:
            if not req.decoding and not req.awaiting_kv and budget > 0:
                budget -= self._take(req, budget, chunks)
        if budget > 0 and self.waiting:
            self._order_waiting()
            prefilling = [r.fill_ids for r in self.running if r.remaining > 1 and not r.awaiting_kv]
            for req in list(self.waiting):
                if budget <= 0 or len(self.running) >= self.max_running:
                    break
                if req.kv_source is not None:
                    if not self._reserve(req):
                        break
                    self.waiting.remove(req)
                    self.running.append(req)
                    self.fetching.append(req)
                    continue
                fill = req.fill_ids
                if self._shares_inflight_prefix(fill, req.extra.get("match_len", 0), prefilling):
                    continue  # wait one step: that prefix will be cached by then
                if not self._admit(req):
                    break
                self.waiting.remove(req)
                self.running.append(req)
                budget -= self._take(req, budget, chunks)
                prefilling.append(fill)
        return chunks

    def cache_progress(self, req: Request) -> None:
        """Hand the whole pages a prefill just computed to the radix cache right away, so
        requests that share the prefix can reuse them before this one finishes."""
        if self.cache is None or req.finished:
            return
        ps = self.page_size
        full = min(req.num_computed, len(req.prompt_ids)) // ps
        if full <= req.num_shared_pages:
            return
        tokens = req.fill_ids[: full * ps]
        self.cache.insert(tokens, req.pages[:full])
        match = self.cache.match(tokens)
        assert match.length == full * ps
        # pages the tree already held for these tokens replace ours (same KV)
        ours = set(req.pages[req.num_shared_pages : full]) - set(match.pages)
        self.cache.lock(match.node)
        if req.cache_node is not None:
            self.cache.unlock(req.cache_node)
        self.pool.free(sorted(ours))
        req.pages[:full] = match.pages
        req.num_shared_pages, req.cache_node = full, match.node

    def finish(self, req: Request, release: bool = True) -> None:
        """Release a finished (or aborted) request, caching its computed pages. With
        release=False its pages stay reserved until `release` (a transfer may still be
        writing them, or a prefill worker holds them for a pull)."""
        if req in self.running:
            self.running.remove(req)
            if release:
                self.release(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    # ---- internals -----------------------------------------------------------------------

    def _take(self, req: Request, budget: int, chunks: list[ScheduledChunk]) -> int:
        n = min(req.remaining, budget)
        chunks.append(ScheduledChunk(req, req.num_computed, n, n == req.remaining))
        return n

    def _order_waiting(self) -> None:
        """Longest cached prefix first; arrival order among equals (the sort is stable)."""
        if self.cache is None or len(self.waiting) < 2:
            return
        for r in self.waiting:
            r.extra["match_len"] = self.cache.match(r.fill_ids).length
        self.waiting.sort(key=lambda r: -r.extra["match_len"])

    def _shares_inflight_prefix(
        self, fill: list[int], cached: int, prefilling: list[list[int]]
    ) -> bool:
        """True when a request being prefilled now covers at least two more pages of fill
        than the cache does (admitting both would compute that prefix twice)."""
        if self.cache is None:
            return False
        return any(
            common_prefix_len(fill, other) - cached >= 2 * self.page_size for other in prefilling
        )

    def _alloc(self, n: int) -> list[int] | None:
        short = n - self.pool.num_free
        if short > 0 and self.cache is not None:
            self.pool.free(self.cache.evict(short))
        if n > self.pool.num_free:
            return None
        return self.pool.alloc(n)

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Give req pages for num_tokens, preempting newer requests if needed. False when
        req itself had to be preempted."""
        need = -(-num_tokens // self.page_size) - len(req.pages)
        while need > 0:
            pages = self._alloc(need)
            if pages is not None:
                req.pages.extend(pages)
                return True
            victim = next(r for r in reversed(self.running) if not r.awaiting_kv)
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.release(req)
        self.waiting.insert(0, req)

    def _admit(self, req: Request) -> bool:
        fill = req.fill_ids
        ps, shared, node, usable = self.page_size, [], None, 0
        if self.cache is not None:
            match = self.cache.match(fill)
            # NOTE: at least one token is always computed, so the last token has logits.
            usable = min(match.length, (len(fill) - 1) // ps * ps)
            if req.params.logprob_start_len >= 0:  # those prompt positions need logits
                usable = min(usable, max(req.params.logprob_start_len - 1, 0) // ps * ps)
            shared, node = match.pages[: usable // ps], match.node
            self.cache.lock(node)
        own = self._alloc(-(-len(fill) // ps) - len(shared))
        if own is None:
            if node is not None and self.cache is not None:
                self.cache.unlock(node)
            return False
        if "admitted" not in req.extra:  # count the prompt once, not on re-admission
            req.extra["admitted"] = True
            req.num_cached = min(usable, len(req.prompt_ids))
            if self.cache is not None:
                self.cache.record_lookup(len(req.prompt_ids), req.num_cached)
        req.pages, req.num_shared_pages, req.cache_node = shared + own, len(shared), node
        req.num_computed = usable
        return True

    def _reserve(self, req: Request) -> bool:
        """Pages for a remote request's whole prompt (no cache match: every page arrives)."""
        own = self._alloc(-(-len(req.prompt_ids) // self.page_size))
        if own is None:
            return False
        req.extra["admitted"] = True  # its lookup is recorded by the prefill worker
        req.pages, req.num_shared_pages, req.cache_node, req.num_computed = own, 0, None, 0
        return True

    def release(self, req: Request) -> None:
        ps, pages, shared = self.page_size, req.pages, req.num_shared_pages
        if self.cache is not None:
            full = req.num_computed // ps
            existing = self.cache.insert(req.fill_ids[: full * ps], pages[:full]) // ps
            # pages the tree already held (besides our shared ones) are duplicates
            self.pool.free(pages[shared:existing] + pages[full:])
            if req.cache_node is not None:
                self.cache.unlock(req.cache_node)
        else:
            self.pool.free(pages[shared:])
        req.pages, req.num_shared_pages, req.cache_node, req.num_computed = [], 0, None, 0
