"""Engine: the step loop (schedule, run, process) on its own thread, fed through an inbox."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from strata.cache.hierarchy import TieredCache, build_cache
from strata.cache.index import CacheIndex
from strata.cache.results import KVEvent
from strata.config import HiCacheConfig, SchedulerConfig
from strata.engine.intake import Inbox, Intake, RequestTable
from strata.engine.logprobs import collect_input_logprobs, wants_input_logprobs
from strata.engine.messages import (
    AbortNow,
    CloseSession,
    EngineStats,
    FlushCache,
    OpenSession,
    Query,
    SessionContext,
    Stats,
)
from strata.engine.offload import Offload
from strata.engine.outputs import Outputs
from strata.engine.request import Checked, KVSource, Limits, Request, RequestOutput
from strata.engine.runner import ModelRunner, RunnerBroken
from strata.engine.scheduler import Scheduler, window_span
from strata.engine.sessions import Sessions
from strata.engine.split import SplitRoles
from strata.grammar.compiler import GrammarCompiler, LazyGrammarCompiler
from strata.sampling.params import SamplingParams

log = logging.getLogger(__name__)
# a forward with at least this many prefill tokens measures the cost of computing a token
OBSERVE_PREFILL_TOKENS = 64


@dataclass(frozen=True)
class EngineOptions:
    """How an engine batches, caches and bounds its requests. tiers: the KV tiers below L1
    (None: L1 only). cluster_worker: the cache records KV events for the cluster's index
    (`event_sink`), which also owns the L3 budget. draft_tokens: n-gram speculation's tokens
    per draft (0: off). max_queued: requests waiting beyond max_running (None: no bound;
    where a front bounds them)."""

    enable_cache: bool = True
    max_batch_tokens: int = 512
    max_running: int = 64
    tiers: HiCacheConfig | None = None
    cluster_worker: bool = False
    jump_forward: bool = True
    grammar_timeout: float = 10.0
    hold_timeout: float = 60.0
    max_queued: int | None = None
    request_timeout: float | None = None
    schedule_policy: str = "lpm"
    draft_tokens: int = 0
    session_pages: float = 0.5  # L1 pages sessions may pin together, a fraction of the pool

    @classmethod
    def of(
        cls,
        sched: SchedulerConfig,
        tiers: HiCacheConfig,
        cluster_worker: bool = False,
        front_limits: bool = True,
    ) -> EngineOptions:
        """From the server's configs (front_limits: the engine bounds its own queue; False
        where a front does)."""
        return cls(
            enable_cache=sched.enable_radix_cache,
            max_batch_tokens=sched.max_batch_tokens,
            max_running=sched.max_running_requests,
            tiers=tiers,
            cluster_worker=cluster_worker,
            max_queued=sched.max_queued_requests if front_limits else None,
            request_timeout=sched.request_timeout or None,
            schedule_policy=sched.schedule_policy,
            draft_tokens=sched.draft_tokens,
            session_pages=sched.session_pages_fraction,
        )


class Engine:
    """The step loop over its parts: a scheduler (what each step computes), a runner (the
    forward), an intake (requests in, any thread), an output stage (sampling, stops, events)
    and the split-mode roles (held pages, KV fetches)."""

    def __init__(
        self, runner: ModelRunner, options: EngineOptions | None = None, **overrides: Any
    ) -> None:
        """options: EngineOptions (overrides: its fields by name, for tests and tools)."""
        o = self.options = replace(options or EngineOptions(), **overrides)
        if runner.tp is not None and o.tiers is not None and o.tiers.enabled:
            raise ValueError(
                "--enable-hierarchical-cache does not work with --tp-size > 1 yet "
                "(each rank's KV heads would need their own tiers)"
            )
        self.runner = runner
        self.tokenizer = runner.tokenizer
        self._inbox: Inbox = queue.SimpleQueue()
        self.prefix_cache, self.scheduler = self._build_scheduler()
        # cluster workers: called on the engine thread with each step's KV events
        self.event_sink: Callable[[list[KVEvent]], None] | None = None
        eos = set(runner.spec.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        grammar = LazyGrammarCompiler(
            self.tokenizer, runner.spec.vocab_size, sorted(self.eos_ids), o.grammar_timeout
        )
        capacity = None if o.max_queued is None else o.max_running + o.max_queued
        self.table = RequestTable(capacity)
        self.intake = Intake(
            self.table,
            self._inbox,
            lambda: self.limits,
            grammar.get,
            self.tokenizer,
            o.request_timeout,
        )
        self.outputs = Outputs(
            runner,
            self.scheduler,
            self.table,
            grammar,
            self.eos_ids,
            o.jump_forward,
            self._hold,
            self._done,
        )
        budget = int(runner.pool.num_pages * o.session_pages)
        self.sessions = Sessions(self.prefix_cache, self.scheduler.page_size, budget)
        self.split = SplitRoles(
            runner, self.scheduler, self.table, self._inbox, self.outputs, o.hold_timeout
        )
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._looping = False  # run() has started: calls wait for the loop
        # called on the loop's thread after each step (the engine process sends the events
        # its requests' sinks collected)
        self.after_step: Callable[[], None] = lambda: None

    def _hold(self, req: Request) -> None:
        self.split.hold(req)

    def _done(self, req: Request) -> None:
        if req.session is not None:
            ok = req.finish_reason in ("stop", "length")
            tokens = req.prompt_ids + req.output_ids
            self.sessions.finished(req.session.id, req.rid, tokens, req.session.replace, ok)

    def _build_scheduler(self) -> tuple[CacheIndex | None, Scheduler]:
        """The prefix cache (None: off) and the scheduler over the runner's pool."""
        runner, o = self.runner, self.options
        tiers, sparse = o.tiers, runner.model.backend.sparse
        # sparse decode's unselected pages may move to L2, which the kernels then read
        fetch_on_select = (
            o.enable_cache
            and tiers is not None
            and tiers.enabled
            and sparse is not None
            and sparse.demote_after > 0
            and runner.kv.data.device.type == "cpu"
        )
        cache = (
            self._build_cache(tiers, o.cluster_worker, fetch_on_select) if o.enable_cache else None
        )
        timeout = tiers.prefetch_timeout if tiers is not None else lambda n: float("inf")
        scheduler = Scheduler(
            runner.pool,
            cache,
            runner.page_size,
            o.max_batch_tokens,
            o.max_running,
            timeout,
            o.schedule_policy,
            o.draft_tokens,
            # NOTE: sparse decode picks pages for single-token rows only: drafts stop where it
            # starts, so a request's output does not depend on whether it drafted
            min(runner.max_context, sparse.min_context if sparse is not None else 1 << 62),
            runner.step_rows,
            window_span(runner.model.spec.windows),
        )
        if fetch_on_select and isinstance(cache, TieredCache):
            assert sparse is not None
            scheduler.offload = Offload(
                cache, runner.pool, sparse.demote_after, sparse.sink_pages, sparse.window_pages
            )
        return cache, scheduler

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

    # ---- the public, thread-safe surface: the intake's and the split roles' -------------

    @property
    def limits(self) -> Limits:
        r = self.runner
        return Limits(
            r.max_context,
            r.spec.vocab_size,
            r.page_size,
            r.pool.num_pages,
            tuple(sorted(self.eos_ids)),
            r.checkpoint,
        )

    @property
    def grammar(self) -> GrammarCompiler:
        """The xgrammar compiler for constrained requests (built on first use)."""
        return self.outputs.grammar

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Checked:
        return self.intake.validate(prompt_ids, params)

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        sink: Callable[[RequestOutput], object],
        rid: str | None = None,
        kv_source: KVSource | None = None,
        hold: bool = False,
    ) -> str:
        return self.intake.submit(prompt_ids, params, sink, rid, kv_source, hold)

    def queue(
        self,
        request: Checked,
        sink: Callable[[RequestOutput], object],
        rid: str | None = None,
        kv_source: KVSource | None = None,
        hold: bool = False,
    ) -> str:
        return self.intake.queue(request, sink, rid, kv_source, hold)

    def stream(
        self,
        request: Checked,
        rid: str | None = None,
        kv_source: KVSource | None = None,
        hold: bool = False,
    ) -> AsyncGenerator[RequestOutput, None]:
        return self.intake.stream(request, rid, kv_source, hold)

    def abort(self, rid: str) -> None:
        self.intake.abort(rid)

    def abort_now(self, rid: str) -> bool:
        """On the engine thread (through `call`): abort a request or release a held one."""
        return self.split.abort_now(rid)

    def held_pages(self, rid: str) -> list[int]:
        return self.split.held_pages(rid)

    def release_held(self, rid: str) -> bool:
        return self.split.release_held(rid)

    @property
    def jump_forward_tokens(self) -> int:
        return self.outputs.jump_forward_tokens

    @property
    def draft_tokens(self) -> int:
        return self.outputs.draft_tokens

    @property
    def accepted_tokens(self) -> int:
        return self.outputs.accepted_tokens

    @property
    def _requests(self) -> dict[str, Request]:
        return self.table.by_id

    def _finish(
        self,
        req: Request,
        reason: str,
        event: RequestOutput | None = None,
        error: str | None = None,
    ) -> None:
        self.outputs.finish(req, reason, event, error)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run fn on the engine thread between steps (safe access to engine state)."""
        fut: Future = Future()
        self._inbox.put(("call", (fn, fut)))
        if not self._looping:  # no step loop runs: run inline
            self._drain()
        return fut

    def answer(self, query: Query) -> Any:
        """A query's answer, on the engine's thread between steps (through `call`)."""
        match query:
            case Stats():
                return self.stats()
            case FlushCache():
                return self.flush_cache()
            case AbortNow(rid):
                return self.abort_now(rid)
            case OpenSession(ttl, capacity):
                return self.sessions.open(ttl, capacity)
            case CloseSession(sid):
                return self.sessions.close(sid)
            case SessionContext(sid, rid, offset, new):
                return self.sessions.context(sid, rid, offset, new)
        raise TypeError(f"unknown query {query!r}")

    async def ask(self, query: Query) -> Any:
        """EngineHandle's query, in process: answered on the engine's thread."""
        return await asyncio.wrap_future(self.call(functools.partial(self.answer, query)))

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
            held=len(self.split.held),
            tiers=self._tier_stats(),
            loop_thread=threading.current_thread().name,
            memory=self.runner.memory.as_dict() if self.runner.memory is not None else None,
            sessions=self.sessions.stats(),
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
        self.split.close()
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
            self.split.expire_held()
            self._expire_requests()
            self.sessions.expire()
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
        timeout = self.options.request_timeout
        if timeout is None:
            return
        now = time.monotonic()
        for req in [r for r in self.table.by_id.values() if r.deadline < now]:
            self._finish(req, "abort", error=f"request timed out after {timeout:g} s")

    def _drain(self) -> None:
        while True:
            try:
                self._handle(*self._inbox.get_nowait())
            except queue.Empty:
                return

    def _handle(self, kind: str, arg: Any) -> None:
        if kind == "add":
            self.table.by_id[arg.rid] = arg
            self.scheduler.add(arg)
        elif kind == "abort":
            self.abort_now(arg)
        elif kind == "fetched":
            self.split.on_fetched(*arg)
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
            self.split.start_fetch(req)
        chunks = plan.chunks
        if not chunks:
            self._publish_events()
            return bool(plan.ended)
        prompt_logprobs = [c for c in chunks if wants_input_logprobs(c)]
        start = time.perf_counter()
        out = self.runner.run([c.sequence() for c in chunks], bool(prompt_logprobs))
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
        self.outputs.sample(chunks, logits)
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
