"""The engine's intake: check a request, queue it for the step loop (any thread), stream its
events to an asyncio caller, abort it. The loop takes what comes through the inbox between
steps. RequestTable counts what the engine holds (the overload bound) and names it by id.

EngineHandle is what a front holds of an engine: the Engine itself (in process: the split
workers) or an EngineClient (an engine process: `strata serve`). Both admit with
`check_capacity` and stream with `events_until_done`."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from typing import Any, Protocol

from strata.engine.request import (
    Checked,
    KVSource,
    Limits,
    Overloaded,
    Request,
    RequestOutput,
)
from strata.grammar.compiler import GrammarCompiler
from strata.sampling.params import SamplingParams
from strata.tokenizer import IncrementalDetokenizer

Inbox = queue.SimpleQueue[tuple[str, Any]]


class EngineHandle(Protocol):
    """An engine as a front uses it, in this process or in its own."""

    @property
    def limits(self) -> Limits: ...

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Checked:
        """The request checked (ValueError), or Overloaded while the engine is full."""
        ...

    def stream(
        self, request: Checked, rid: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        """Its events until one finishes it; closing the generator aborts the request."""
        ...

    async def ask(self, query: Any) -> Any:
        """A strata.engine.messages Query answered between steps."""
        ...


def check_capacity(held: int, capacity: int | None) -> None:
    """Overloaded when `held` requests fill the capacity (None: no bound)."""
    if capacity is not None and held >= capacity:
        raise Overloaded(
            f"the server holds {held} requests, its limit "
            "(--max-running-requests + --max-queued-requests); retry later"
        )


async def events_until_done(
    events: asyncio.Queue[RequestOutput], abandon: Callable[[], None]
) -> AsyncGenerator[RequestOutput, None]:
    """A request's events from its queue until one finishes it; closed before that (the
    caller went away), abandon() (which aborts it)."""
    finished = False
    try:
        while not finished:
            event = await events.get()
            finished = event.finish_reason is not None
            yield event
    finally:
        if not finished:
            abandon()


class RequestTable:
    """The requests submitted and not finished: counted across threads (at most capacity;
    None: no bound) and, once the loop has taken them, by id."""

    def __init__(self, capacity: int | None) -> None:
        self.by_id: dict[str, Request] = {}
        self.capacity = capacity
        self.outstanding = 0
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def admit(self) -> None:
        """Overloaded while the engine holds as many requests as it may."""
        check_capacity(self.outstanding, self.capacity)

    def new_id(self) -> str:
        return f"req-{next(self._ids)}"

    def taken(self) -> None:
        with self._lock:
            self.outstanding += 1

    def done(self, req: Request) -> None:
        with self._lock:
            self.outstanding -= 1
        self.by_id.pop(req.rid, None)


class Intake:
    """validate / submit / queue / abort / stream, safe from any thread."""

    def __init__(
        self,
        table: RequestTable,
        inbox: Inbox,
        limits: Callable[[], Limits],
        grammar: Callable[[], GrammarCompiler],
        tokenizer: Any,
        request_timeout: float | None,
    ) -> None:
        self.table, self.inbox = table, inbox
        self.limits, self.grammar, self.tokenizer = limits, grammar, tokenizer
        self.request_timeout = request_timeout  # seconds from submit; None: no limit

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Checked:
        """The request, checked (ValueError for one that can never run), or Overloaded
        while the engine holds as many requests as it may."""
        self.table.admit()
        return self.limits().check(prompt_ids, params, lambda c: self.grammar().compile(c))

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
        self.table.admit()
        if rid is not None and rid in self.table.by_id:
            raise ValueError(f"request id {rid!r} is already in use")
        rid = rid or self.table.new_id()
        params = request.params
        req = Request(rid, list(request.prompt_ids), params, sink, kv_source=kv_source, hold=hold)
        req.session = request.session
        if self.request_timeout is not None:
            req.deadline = req.arrival + self.request_timeout
        if self.tokenizer is not None:
            req.detok = IncrementalDetokenizer(self.tokenizer)
        if params.constraint is not None:
            req.matcher = self.grammar().matcher(params.constraint)
        if request.resume_ids:
            req.resume(request.resume_ids)
        self.table.taken()
        self.inbox.put(("add", req))
        return rid

    def abort(self, rid: str) -> None:
        self.inbox.put(("abort", rid))

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
        async with aclosing(events_until_done(events, lambda: self.abort(rid))) as stream:
            async for event in stream:
                yield event
