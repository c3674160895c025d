"""Scheduler: continuous batching with chunked prefill, prefix-aware admission, preemption.

Each step takes every running decode token, then continues partial prefills, then admits
waiting requests (longest cached prefix first) while the token budget lasts. Pages come from
the pool; when it runs dry the radix cache is evicted first, then the newest running request
is preempted (its computed pages go to the cache, so re-admission recomputes little).

With KV tiers, a waiting request whose prefix is in L2 (or continues in L3) first has those
pages loaded into L1 (the cache starts the loads; it waits for L2 loads always and for L3
loads as the prefetch policy says), then is admitted with a longer L1 match.

A request whose prompt KV comes from a prefill worker (split mode) is admitted by reserving
pages for its whole prompt; it computes nothing until the engine reports the KV landed, and
it is never preempted while the transfer may still write into its pages.

With n-gram speculation (draft_tokens > 0), a greedy decoding request's chunk carries the
tokens its n-gram index proposes after the sampled one; the forward computes them all, the
engine keeps the prefix the model agrees with (`accept_draft`), and the KV written for the
rest lies past num_computed, to be overwritten. Draft tokens take only free pages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from strata.batch import SequenceChunk
from strata.cache.index import CacheIndex
from strata.cache.keys import common_prefix_len
from strata.engine.ngram import NgramDrafter
from strata.engine.offload import Offload
from strata.engine.request import Request, Status
from strata.kv.mover import LoadPlan
from strata.kv.pool import PagePool, alloc_evicting


@dataclass
class ScheduledChunk:
    req: Request
    start: int  # first token of req.fill_ids computed in this step
    length: int
    sample: bool  # the chunk ends the fill, so its last logits give the next token
    draft: Sequence[int] = ()  # proposed tokens after the fill, the chunk's last tokens

    @property
    def logit_rows(self) -> int:
        """Rows of logits the chunk needs: its last token's and each draft token's."""
        return 1 + len(self.draft)

    def sequence(self) -> SequenceChunk:
        """The tokens this chunk computes, as the runner takes them."""
        req, n_prompt = self.req, len(self.req.prompt_ids)
        end = self.start + self.length - len(self.draft)
        if self.start >= n_prompt:
            tokens = req.output_ids[self.start - n_prompt : end - n_prompt]
        else:
            tokens = (req.prompt_ids + req.output_ids)[self.start : end]
        if self.draft:
            tokens = tokens + list(self.draft)
        pages, rows = req.pages, self.logit_rows
        return SequenceChunk(tokens, self.start, pages, req.rid, req.segment_ends, rows)


@dataclass
class Schedule:
    """What one step does: the chunks to compute, the requests that ended for want of pages
    (their context outgrew the pool: they finish with "length"), and the remote requests just
    admitted whose KV the engine must start fetching."""

    chunks: list[ScheduledChunk]
    ended: list[Request]
    to_fetch: list[Request]


def window_span(windows: tuple[int, ...]) -> int:
    """The most keys any layer reads back from a token where every layer has a sliding
    window (Mistral v0.1, Phi-3: the pages behind it are never read again); 0 where a layer
    reads the whole context (Gemma's global layers, or no windows)."""
    return max(windows) if windows and all(windows) else 0


class Scheduler:
    def __init__(
        self,
        pool: PagePool,
        prefix_cache: CacheIndex | None,
        page_size: int,
        max_batch_tokens: int,
        max_running: int,
        prefetch_timeout: Callable[[int], float] = lambda prompt_tokens: float("inf"),
        policy: str = "lpm",
        draft_tokens: int = 0,
        draft_context: int = 1 << 62,
        draft_rows: int = 32,
        window: int = 0,
    ) -> None:
        """window: the most keys any layer reads back from a token, where every layer has a
        sliding window (0: some layer reads the whole context); a running request's own
        pages behind it go back to the pool as it advances."""
        self.pool, self.prefix_cache, self.page_size = pool, prefix_cache, page_size
        self.window = window
        self.max_batch_tokens, self.max_running = max_batch_tokens, max_running
        self.prefetch_timeout = prefetch_timeout  # seconds to wait for L3 loads, per prompt
        self.policy = policy  # "lpm": longest cached prefix first; "fcfs": arrival order
        self.draft_tokens = draft_tokens  # n-gram speculation: tokens per draft (0: off)
        self.draft_context = draft_context  # drafts end before this context length
        # NOTE: drafts fill a step's rows up to draft_rows (runner.step_rows): past them a
        # row costs about what a plain token costs (bf16 at 570 tokens of context: ~0.5 ms
        # a row past 32 rows; int4 0.4 ms past 16), and a draft token is kept at ~0.9 at best
        self.draft_rows = draft_rows
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # admitted (holding pages), oldest first
        self.offload: Offload | None = None  # fetch on select (sparse decode over KV tiers)
        self.preemptions = 0  # requests sent back to the queue for want of pages
        self._plan = Schedule([], [], [])  # the step being scheduled

    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)

    def advance(self, chunks: list[ScheduledChunk]) -> None:
        """A forward computed these chunks: their KV is in the pages (prefill pages go to
        the radix cache right away)."""
        for c in chunks:
            c.req.num_computed += c.length - len(c.draft)  # accept_draft counts the rest
            if c.length > 1 and not c.draft:
                self.cache_progress(c.req)
            if self.window:
                self._drop_behind_window(c.req)

    def _drop_behind_window(self, req: Request) -> None:
        """Free the request's own pages that every layer's window has passed: its next token
        (at position num_computed) reads keys from num_computed - window + 1 on. Pages the
        radix cache owns stay (it may serve the prefix again), and so do the pages of a
        request another party still reads (a prefill held for a transfer, KV arriving from a
        prefill worker, sparse decode's pages in L2)."""
        if req.hold or req.kv_source is not None or self.offload is not None or req.finished:
            return
        behind = (req.num_computed - self.window + 1) // self.page_size
        start = max(req.num_shared_pages, req.behind_window)
        if behind > start:
            self.pool.free(req.pages[start:behind])
            req.behind_window = behind

    def accept_draft(self, req: Request, n: int) -> None:
        """The first n draft tokens of req's last chunk were the model's own: their KV
        stands."""
        req.num_computed += n

    def remote_filled(self, req: Request, cached_tokens: int, by_tier: tuple[int, int]) -> None:
        """A remote request's prompt KV has landed in its pages (split mode, decode role);
        the prefill worker had cached_tokens of it (by_tier: loaded from its L2, L3)."""
        req.num_computed, req.num_cached = len(req.prompt_ids), cached_tokens
        req.cached_by_tier = by_tier
        self.cache_progress(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Schedule:
        self._plan = plan = Schedule([], [], [])
        chunks = plan.chunks
        # Decoding requests: the sampled token, plus any tokens jump-forward decoding forced.
        spare = self.draft_rows - len(self.running)  # rows for draft tokens
        # NOTE: shared out evenly (what one request leaves, the next may take): a draft's
        # first tokens are the likeliest kept, and the slowest conversation gets its share
        left = len(self.running)
        for req in list(self.running):
            share, left = -(-spare // left), left - 1
            if req.decoding and req in self.running and self._grow(req, req.num_fill):
                draft = self._draft(req, share)
                spare -= len(draft)
                chunks.append(
                    ScheduledChunk(req, req.num_computed, req.remaining + len(draft), True, draft)
                )
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
                    self._run(req)
                    plan.to_fetch.append(req)
                    continue
                if self._loading(req):
                    continue  # its prefix is on its way into L1
                fill = req.fill_ids
                if self._shares_inflight_prefix(fill, req.match_len, prefilling):
                    continue  # wait one step: that prefix will be cached by then
                if not self._admit(req):
                    break
                self._run(req)
                budget -= self._take(req, budget, chunks)
                prefilling.append(fill)
        return plan

    def cache_progress(self, req: Request) -> None:
        """Hand the whole pages a prefill just computed to the radix cache right away, so
        requests that share the prefix can reuse them before this one finishes."""
        if self.prefix_cache is None or req.finished or req.num_demoted:
            return
        if req.behind_window > req.num_shared_pages:
            return  # some of its own pages are gone: the tree takes no more of them
        ps = self.page_size
        full = min(req.num_computed, len(req.prompt_ids)) // ps
        if full <= req.num_shared_pages:
            return
        tokens = req.fill_ids[: full * ps]
        self.prefix_cache.insert(tokens, req.pages[:full])
        match = self.prefix_cache.match(tokens)
        assert match.length == full * ps
        # pages the tree already held for these tokens replace ours (same KV)
        ours = set(req.pages[req.num_shared_pages : full]) - set(match.pages)
        self.prefix_cache.lock(match.node)
        if req.cache_node is not None:
            self.prefix_cache.unlock(req.cache_node)
        self.pool.free(sorted(ours))
        req.pages[:full] = match.pages
        req.num_shared_pages, req.cache_node = full, match.node
        req.segment_ends = self._segment_ends(req, match.node, full)

    def on_loaded(self, plan: LoadPlan) -> None:
        """A load has ended (engine thread): its pages join the cache."""
        assert self.prefix_cache is not None
        self.prefix_cache.finish_load(plan)
        req = plan.owner
        if isinstance(req, Request) and plan in req.loads:
            req.loads.remove(plan)
            if plan.loaded:
                end = plan.start + plan.loaded * self.page_size
                req.loaded_spans.append((plan.source, plan.start, end))

    def finish(self, req: Request, release: bool = True) -> None:
        """Release a finished (or aborted) request, caching its computed pages. With
        release=False its pages stay reserved until `release` (a transfer may still be
        writing them, or a prefill worker holds them for a pull)."""
        req.status = Status.FINISHED
        if req in self.running:
            self.running.remove(req)
            if release:
                self.release(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    # ---- internals -----------------------------------------------------------------------

    def _run(self, req: Request) -> None:
        self.waiting.remove(req)
        self.running.append(req)
        req.status = Status.RUNNING

    def _take(self, req: Request, budget: int, chunks: list[ScheduledChunk]) -> int:
        n = min(req.remaining, budget)
        chunks.append(ScheduledChunk(req, req.num_computed, n, n == req.remaining))
        return n

    def _draft(self, req: Request, spare: int) -> list[int]:
        """Up to `spare` n-gram draft tokens to verify after req's sampled token ([] for a
        request that does not pick by argmax alone, or with no match)."""
        p = req.params
        if (
            spare <= 0
            or not self.draft_tokens
            or req.remaining != 1
            or not p.greedy
            or p.penalized
            or p.logit_bias
            or p.logprobs
            or req.matcher is not None
        ):
            return []
        if req.drafter is None:
            req.drafter = NgramDrafter()
        if not req.drafter.sync(req.prompt_ids, req.output_ids):
            return []
        room = min(p.max_new_tokens - len(req.output_ids), self.draft_context - req.num_fill) - 1
        draft = req.drafter.propose(min(self.draft_tokens, room, spare)) if room > 0 else []
        ps = self.page_size
        need = -(-(req.num_fill + len(draft)) // ps) - len(req.pages)
        if need > 0:  # free pages only: a guess never evicts the cache or preempts
            if need <= self.pool.num_free:
                req.pages.extend(self.pool.alloc(need))
            else:
                draft = draft[: len(req.pages) * ps - req.num_fill]
        return draft

    def _order_waiting(self) -> None:
        """Longest cached prefix first; arrival order among equals (the sort is stable)."""
        if self.prefix_cache is None or len(self.waiting) < 2 or self.policy == "fcfs":
            return
        for r in self.waiting:
            r.match_len = self.prefix_cache.match(r.fill_ids).length
        self.waiting.sort(key=lambda r: -r.match_len)

    def _shares_inflight_prefix(
        self, fill: list[int], cached: int, prefilling: list[list[int]]
    ) -> bool:
        """True when a request being prefilled now covers at least two more pages of fill
        than the cache does (admitting both would compute that prefix twice)."""
        if self.prefix_cache is None:
            return False
        return any(
            common_prefix_len(fill, other) - cached >= 2 * self.page_size for other in prefilling
        )

    def _alloc(self, n: int) -> list[int] | None:
        return alloc_evicting(
            self.pool, n, self.prefix_cache.evict if self.prefix_cache is not None else None
        )

    def _loading(self, req: Request) -> bool:
        """Start loading req's prefix from the lower tiers (once per wait); True while it
        must wait for a load: always for L2, for L3 until its prefetch deadline."""
        if self.prefix_cache is None:
            return False
        if not req.loads_planned:
            req.loads_planned = True
            req.loads = self.prefix_cache.plan_loads(req.fill_ids)
            for plan in req.loads:
                plan.owner = req
            req.load_deadline = time.monotonic() + self.prefetch_timeout(len(req.prompt_ids))
        if not req.loads:
            return False
        if any(p.source == "l2" for p in req.loads):
            return True
        return time.monotonic() < req.load_deadline

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Give req pages for num_tokens, preempting newer requests if needed. False when
        req itself had to be preempted."""
        need = -(-num_tokens // self.page_size) - len(req.pages)
        while need > 0:
            pages = self._alloc(need)
            if pages is not None:
                req.pages.extend(pages)
                return True
            if self.offload is not None and self.offload.demote(self.running, need):
                continue
            victim = next(r for r in reversed(self.running) if not r.awaiting_kv)
            if victim is req and len(self.running) == 1:  # the pool cannot hold it alone
                self._plan.ended.append(req)  # running alone and still out of pages
                return False
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.preemptions += 1
        self.running.remove(req)
        self.release(req)
        req.loads_planned = False  # its pages may be in L2 by the time it comes back
        req.status = Status.WAITING
        self.waiting.insert(0, req)

    def _admit(self, req: Request) -> bool:
        fill = req.fill_ids
        ps, shared, node, usable = self.page_size, [], None, 0
        if self.prefix_cache is not None:
            match = self.prefix_cache.match(fill)
            # NOTE: at least one token is always computed, so the last token has logits.
            usable = min(match.length, (len(fill) - 1) // ps * ps)
            if req.params.logprob_start_len >= 0:  # those prompt positions need logits
                usable = min(usable, max(req.params.logprob_start_len - 1, 0) // ps * ps)
            shared, node = match.pages[: usable // ps], match.node
            self.prefix_cache.lock(node)
        own = self._alloc(-(-len(fill) // ps) - len(shared))
        if own is None:
            if node is not None and self.prefix_cache is not None:
                self.prefix_cache.unlock(node)
            return False
        if not req.admitted:  # count the prompt once, not on re-admission
            req.admitted, req.admitted_at = True, time.monotonic()
            req.num_cached = min(usable, len(req.prompt_ids))
            if self.prefix_cache is not None:
                by_tier = dict.fromkeys(("l2", "l3"), 0)
                for tier, start, end in req.loaded_spans:
                    by_tier[tier] += max(0, min(end, req.num_cached) - start)
                req.cached_by_tier = (by_tier["l2"], by_tier["l3"])
                self.prefix_cache.record_lookup(
                    len(req.prompt_ids), req.num_cached, by_tier["l2"], by_tier["l3"]
                )
                if node is not None:
                    self.prefix_cache.record_hit(node)
        req.loads = []  # a load still running now only feeds the cache
        req.pages, req.num_shared_pages, req.cache_node = shared + own, len(shared), node
        req.num_computed = usable
        req.segment_ends = self._segment_ends(req, node, len(shared))
        return True

    def _segment_ends(self, req: Request, node: int | None, shared: int) -> tuple[int, ...]:
        """Where the radix segments of req's page table end: the cache nodes of its first
        `shared` pages (node: the deepest), then the rest of its prompt's whole pages."""
        ends, end = [], 0
        if node is not None and self.prefix_cache is not None:
            for count in self.prefix_cache.segments(node):
                if end + count > shared:
                    break
                end += count
                ends.append(end)
        prompt = len(req.prompt_ids) // self.page_size
        if prompt > end:
            ends.append(prompt)
        return tuple(ends)

    def _reserve(self, req: Request) -> bool:
        """Pages for a remote request's whole prompt (no cache match: every page arrives)."""
        own = self._alloc(-(-len(req.prompt_ids) // self.page_size))
        if own is None:
            return False
        req.admitted, req.admitted_at = True, time.monotonic()  # lookup: the prefill worker's
        req.pages, req.num_shared_pages, req.cache_node, req.num_computed = own, 0, None, 0
        req.segment_ends = self._segment_ends(req, None, 0)
        return True

    def release(self, req: Request) -> None:
        if self.offload is not None:
            self.offload.restore(req, self.page_size)
        ps, pages, shared = self.page_size, req.pages, req.num_shared_pages
        # pages behind every window are back in the pool already: the tree keeps the prefix
        # it owns, and the rest is freed from where the request's own pages still are
        live = max(shared, req.behind_window)
        if self.prefix_cache is not None:
            full = req.num_computed // ps if live == shared else shared
            tokens = req.fill_ids[: full * ps]
            existing = self.prefix_cache.insert(tokens, pages[:full]) // ps
            if req.params.priority and req.finished:
                self.prefix_cache.prioritize(tokens, req.params.priority, req.params.priority_ttl)
            # pages the tree already held (besides our shared ones) are duplicates
            self.pool.free(pages[shared:existing] + pages[max(full, live) :])
            if req.cache_node is not None:
                self.prefix_cache.unlock(req.cache_node)
        else:
            self.pool.free(pages[live:])
        req.pages, req.num_shared_pages, req.cache_node, req.num_computed = [], 0, None, 0
        req.segment_ends, req.behind_window = (), 0
