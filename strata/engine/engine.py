"""Engine: the step loop (schedule, run, process) on its own thread, fed through an inbox."""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from strata.cache.hierarchy import TieredCache, build_cache
from strata.cache.index import CacheIndex
from strata.cache.results import KVEvent
from strata.config import HiCacheConfig
from strata.engine.intake import RequestIntake
from strata.engine.logprobs import collect_input_logprobs, wants_input_logprobs
from strata.engine.offload import Offload
from strata.engine.outputs import RequestOutputs
from strata.engine.request import (
    Request,
)
from strata.engine.runner import ModelRunner, RunnerBroken
from strata.engine.scheduler import Scheduler
from strata.engine.split import SplitRoles
from strata.grammar.compiler import LazyGrammarCompiler

log = logging.getLogger(__name__)
# a forward with at least this many prefill tokens measures the cost of computing a token
OBSERVE_PREFILL_TOKENS = 64


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    pages_total: int
    pages_free: int
    cache: Any  # TreeStats | None
    jump_forward_tokens: int  # tokens appended by jump-forward decoding (no step sampled)
    draft_tokens: int = 0  # n-gram speculation: draft tokens verified
    accepted_tokens: int = 0  # ... and kept (the model's argmax agreed)
    held: int = 0  # prefill role: finished prompts whose pages wait to be pulled
    tiers: dict[str, Any] | None = None  # pages, bytes and traffic per KV tier (with tiers)
    loop_thread: str = ""  # the thread that runs the step loop (stats runs on it)
    memory: dict[str, Any] | None = None  # the runner's MemoryPlan (engine.memory)


class Engine(RequestIntake, RequestOutputs, SplitRoles):
    def __init__(
        self,
        runner: ModelRunner,
        enable_cache: bool = True,
        max_batch_tokens: int = 512,
        max_running: int = 64,
        tiers: HiCacheConfig | None = None,
        cluster_worker: bool = False,
        jump_forward: bool = True,
        grammar_timeout: float = 10.0,
        hold_timeout: float = 60.0,
        max_queued: int | None = None,
        request_timeout: float | None = None,
        schedule_policy: str = "lpm",
        draft_tokens: int = 0,
    ) -> None:
        """tiers: the KV tiers below L1 (None: L1 only). cluster_worker: the cache records KV
        events for the cluster's index (`event_sink`), which also owns the L3 budget.
        draft_tokens: n-gram speculation's tokens per draft (0: off)."""
        if runner.tp is not None and tiers is not None and tiers.enabled:
            raise ValueError(
                "--enable-hierarchical-cache does not work with --tp-size > 1 yet "
                "(each rank's KV heads would need their own tiers)"
            )
        self.runner = runner
        self.tokenizer = runner.tokenizer
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        sparse = runner.model.backend.sparse
        # sparse decode's unselected pages may move to L2, which the kernels then read
        fetch_on_select = (
            enable_cache
            and tiers is not None
            and tiers.enabled
            and sparse is not None
            and sparse.demote_after > 0
            and runner.kv.data.device.type == "cpu"
        )
        self.prefix_cache = (
            self._build_cache(tiers, cluster_worker, fetch_on_select) if enable_cache else None
        )
        timeout = tiers.prefetch_timeout if tiers is not None else lambda n: float("inf")
        self.scheduler = Scheduler(
            runner.pool,
            self.prefix_cache,
            runner.page_size,
            max_batch_tokens,
            max_running,
            timeout,
            schedule_policy,
            draft_tokens,
            # NOTE: sparse decode picks pages for single-token rows only: drafts stop where it
            # starts, so a request's output does not depend on whether it drafted
            min(runner.max_context, sparse.min_context if sparse is not None else 1 << 62),
            runner.step_rows,
        )
        if fetch_on_select and isinstance(self.prefix_cache, TieredCache):
            assert sparse is not None
            self.scheduler.offload = Offload(
                self.prefix_cache,
                runner.pool,
                sparse.demote_after,
                sparse.sink_pages,
                sparse.window_pages,
            )
        # cluster workers: called on the engine thread with each step's KV events
        self.event_sink: Callable[[list[KVEvent]], None] | None = None
        eos = set(runner.spec.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self._requests: dict[str, Request] = {}
        # submitted and not finished, counted across threads: the overload bound
        self._capacity = None if max_queued is None else max_running + max_queued
        self._outstanding = 0
        self._count_lock = threading.Lock()
        self.request_timeout = request_timeout  # seconds from submit; None: no limit
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._looping = False  # run() has started: calls wait for the loop
        self._grammar = LazyGrammarCompiler(
            self.tokenizer, runner.spec.vocab_size, sorted(self.eos_ids), grammar_timeout
        )
        self.jump_forward = jump_forward
        # called on the loop's thread after each step (the engine process sends the events
        # its requests' sinks collected)
        self.after_step: Callable[[], None] = lambda: None
        self.jump_forward_tokens = 0
        self.draft_tokens = self.accepted_tokens = 0
        self._init_split_roles(hold_timeout)

    def _build_cache(
        self, tiers: HiCacheConfig | None, cluster_worker: bool, fetch_on_select: bool
    ) -> CacheIndex:
        """The prefix cache over the runner's pool and the tiers below it. cluster_worker: it
        records KV events for the cluster's index, which owns the L3 budget. fetch_on_select:
        L2 becomes the tail of the pool the kernels read."""
        runner = self.runner
        if fetch_on_select:
            assert tiers is not None
            n1 = runner.pool.num_pages
            total = n1 + tiers.host_pages(n1, runner.kv.bytes_per_page)
            runner.kv = runner.kv.like(total, "cpu", pin_memory=False)
        return build_cache(
            runner.kv,
            runner.pool,
            runner.identity,
            tiers,
            record_events=cluster_worker,
            own_store_index=not cluster_worker,
            on_loaded=lambda plan: self._inbox.put(("loaded", plan)),
        )

    # ---- the public, thread-safe surface (requests: intake.py) ---------------------------

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run fn on the engine thread between steps (safe access to engine state)."""
        fut: Future = Future()
        self._inbox.put(("call", (fn, fut)))
        if not self._looping:  # no step loop runs: run inline
            self._drain()
        return fut

    def stats(self) -> EngineStats:
        pool = self.runner.pool
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            pages_total=pool.num_pages,
            pages_free=pool.num_free,
            cache=self.prefix_cache.stats() if self.prefix_cache is not None else None,
            jump_forward_tokens=self.jump_forward_tokens,
            draft_tokens=self.draft_tokens,
            accepted_tokens=self.accepted_tokens,
            held=len(self._held),
            tiers=self._tier_stats(),
            loop_thread=threading.current_thread().name,
            memory=self.runner.memory.as_dict() if self.runner.memory is not None else None,
        )

    def _tier_stats(self) -> dict[str, Any] | None:
        stats = self.prefix_cache.tier_stats() if self.prefix_cache is not None else None
        if stats is not None and self.scheduler.offload is not None:
            stats["fetch_on_select"] = self.scheduler.offload.stats()
        return stats

    def flush_cache(self) -> int:
        """Drop every unlocked cached page; returns how many were freed."""
        if self.prefix_cache is None:
            return 0
        pages = self.prefix_cache.flush()
        self.runner.pool.free(pages)
        return len(pages)

    def start(self) -> None:
        """Run the step loop on a thread of its own (split workers; `strata serve` runs it
        on the main thread of the engine process instead, see strata.engine.process)."""
        self.expect_loop()
        self._thread = threading.Thread(target=self.run, name="strata-engine", daemon=True)
        self._thread.start()

    def expect_loop(self) -> None:
        """From now on calls wait for the step loop (the caller is about to run it)."""
        self._looping = True

    def stop(self) -> None:
        """Make the step loop return (its requests end with an abort event)."""
        self._stopping.set()
        self._inbox.put(("wake", None))

    def close(self) -> None:
        """Stop the side threads and the tiers (after the loop has returned)."""
        if self._fetchers is not None:
            self._fetchers.shutdown(wait=False, cancel_futures=True)
        if self.prefix_cache is not None:
            self.prefix_cache.close()
        self.runner.close()

    def shutdown(self, timeout: float = 10.0) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout)
        self.close()

    # ---- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        """The step loop, on the calling thread, until stop()."""
        self.expect_loop()
        while not self._stopping.is_set():
            self._drain()
            self._expire_held()
            self._expire_requests()
            try:
                busy = self.step()
            except Exception as exc:  # a failed step fails its requests, never the server
                log.exception("engine step failed")
                for req in list(self.scheduler.running) + list(self.scheduler.waiting):
                    self._finish(req, "error", error=f"internal error: {exc}")
                if isinstance(exc, RunnerBroken):
                    self.after_step()  # the error events go out before the engine ends
                    raise
                busy = True
            self.after_step()
            if not busy:  # nothing runnable: sleep until something arrives
                with contextlib.suppress(queue.Empty):
                    self._handle(*self._inbox.get(timeout=1.0))
        for req in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(req, "abort", error="server shutting down")
        self.after_step()

    def _expire_requests(self) -> None:
        """Abort the requests past their deadline (an event says why; pages are freed)."""
        if self.request_timeout is None:
            return
        now = time.monotonic()
        for req in [r for r in self._requests.values() if r.deadline < now]:
            self._finish(req, "abort", error=f"request timed out after {self.request_timeout:g} s")

    def _drain(self) -> None:
        while True:
            try:
                self._handle(*self._inbox.get_nowait())
            except queue.Empty:
                return

    def _handle(self, kind: str, arg: Any) -> None:
        if kind == "add":
            self._requests[arg.rid] = arg
            self.scheduler.add(arg)
        elif kind == "abort":
            self.abort_now(arg)
        elif kind == "fetched":
            self._on_fetched(*arg)
        elif kind == "loaded":
            self.scheduler.on_loaded(arg)
        elif kind == "call":
            fn, fut = arg
            try:
                fut.set_result(fn())
            except Exception as exc:
                fut.set_exception(exc)

    def step(self) -> bool:
        """One schedule / forward / process round; False when there was nothing to do."""
        plan = self.scheduler.schedule()
        for req in plan.ended:
            self._finish(req, "length")
        for req in plan.to_fetch:
            self._start_fetch(req)
        chunks = plan.chunks
        if not chunks:
            self._publish_events()
            return bool(plan.ended)
        prompt_logprobs = [c for c in chunks if wants_input_logprobs(c)]
        start = time.perf_counter()
        out = self.runner.run([self._sequence(c) for c in chunks], bool(prompt_logprobs))
        logits = out.logits
        filled = sum(c.length for c in chunks if c.length > 1 and not c.draft)
        if self.prefix_cache is not None and filled >= OBSERVE_PREFILL_TOKENS:
            self.prefix_cache.observe_compute(filled, time.perf_counter() - start)
        if prompt_logprobs:
            logits = collect_input_logprobs(chunks, logits)
        self.scheduler.advance(chunks)
        offload = self.scheduler.offload
        if offload is not None:
            reqs = [c.req for c in chunks]
            offload.after_forward(reqs, out.selected, len(self.scheduler.running))
        if out.sparsity is not None:  # sparse decode ran this step
            for c, (skipped, considered) in zip(chunks, out.sparsity):
                c.req.sparse_skipped += skipped
                c.req.sparse_considered += considered
        self._sample_chunks(chunks, logits)
        self._publish_events()
        return True

    def _publish_events(self) -> None:
        if self.event_sink is not None and self.prefix_cache is not None:
            events = self.prefix_cache.take_events()
            if events:
                self.event_sink(events)

    def run_until_done(self) -> None:
        """Drive the loop on the calling thread until no request is left (tests, tools)."""
        self._drain()
        self._expire_requests()
        while self.scheduler.has_work:
            if not self.step():
                self._handle(*self._inbox.get())  # e.g. a transfer landing
            self._drain()
            self._expire_requests()
