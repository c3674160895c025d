"""The engine's public intake, mixed into Engine: check a request, queue it for the step loop
(any thread), stream its events to an asyncio caller, abort it. The loop takes what comes
through the inbox between steps."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from strata.engine.request import (
    Checked,
    KVSource,
    Limits,
    Overloaded,
    Request,
    RequestOutput,
)
from strata.engine.runner import ModelRunner
from strata.grammar.compiler import GrammarCompiler
from strata.sampling.params import SamplingParams
from strata.tokenizer import IncrementalDetokenizer


class RequestIntake:
    runner: ModelRunner
    tokenizer: Any
    eos_ids: frozenset[int]
    request_timeout: float | None
    _inbox: queue.SimpleQueue[tuple[str, Any]]
    _requests: dict[str, Request]
    _capacity: int | None  # submitted and not finished, at most (None: no bound)
    _outstanding: int
    _count_lock: threading.Lock
    _ids: itertools.count
    grammar: GrammarCompiler  # RequestOutputs'

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

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Checked:
        """The request, checked (ValueError for one that can never run), or Overloaded
        while the engine holds as many requests as it may."""
        self._admit()
        return self.limits.check(prompt_ids, params, lambda c: self.grammar.compile(c))

    def _admit(self) -> None:
        if self._capacity is not None and self._outstanding >= self._capacity:
            raise Overloaded(
                f"the server holds {self._outstanding} requests, its limit "
                "(--max-running-requests + --max-queued-requests); retry later"
            )

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        sink: Callable[[RequestOutput], object],
        rid: str | None = None,
        kv_source: KVSource | None = None,
        hold: bool = False,
    ) -> str:
        """Check and queue a request (in-process callers; a front checks once and calls
        `queue`)."""
        return self.queue(self.validate(prompt_ids, params), sink, rid, kv_source, hold)

    def queue(
        self,
        request: Checked,
        sink: Callable[[RequestOutput], object],
        rid: str | None = None,
        kv_source: KVSource | None = None,
        hold: bool = False,
    ) -> str:
        """Queue a checked request. kv_source (split mode, decode role): the prompt's KV and
        first token come from a prefill worker once pages are reserved. hold (prefill role):
        keep the pages after the first token until `release_held`."""
        self._admit()
        if rid is not None and rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in use")
        rid = rid or f"req-{next(self._ids)}"
        params = request.params
        req = Request(rid, list(request.prompt_ids), params, sink, kv_source=kv_source, hold=hold)
        if self.request_timeout is not None:
            req.deadline = req.arrival + self.request_timeout
        if self.tokenizer is not None:
            req.detok = IncrementalDetokenizer(self.tokenizer)
        if params.constraint is not None:
            req.matcher = self.grammar.matcher(params.constraint)
        with self._count_lock:
            self._outstanding += 1
        self._inbox.put(("add", req))
        return rid

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))

    async def stream(
        self,
        request: Checked,
        rid: str | None = None,
        kv_source: KVSource | None = None,
        hold: bool = False,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Queue a checked request and yield its events on the caller's asyncio loop until
        one finishes it. Closing the generator early aborts the request (frees its pages)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[RequestOutput] = asyncio.Queue()
        rid = self.queue(
            request,
            lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
            rid,
            kv_source,
            hold,
        )
        finished = False
        try:
            while not finished:
                event = await events.get()
                finished = event.finish_reason is not None
                yield event
        finally:
            if not finished:  # the caller went away
                self.abort(rid)
