"""What the REST and gRPC fronts share: one chat-role rule, validation before anything is
sent, a generation's events with its metrics recorded, and a generation collected to its end.
Each front only translates its wire format to and from these calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.backend import Backend
from gateway.metrics import Metrics
from gateway.protocol import SessionParams
from gateway.tool_formats import FORMATS, ToolFormat
from strata.engine.request import Checked, RequestOutput, SessionRef
from strata.sampling.params import SamplingParams
from strata.tokenizer import chat_prompt_ids

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass
class Collected:
    """A generation run to its end: the text and tokens of every event, and the last event
    (finish reason, usage; input_logprobs gathered from every event)."""

    text: str
    token_ids: list[int]
    last: RequestOutput
    logprobs: list[tuple[int, float, dict[int, float]]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.last.finish_reason == "error"

    @property
    def error(self) -> str:
        return self.last.error or "generation failed"


class Front:
    def __init__(self, backend: Backend, metrics: Metrics, tools: ToolFormat = FORMATS["json"]):
        """tools: how chat requests' tools reach the prompt and their calls are read
        (--tool-call-parser)."""
        self.backend, self.metrics = backend, metrics
        self.tokenizer = backend.tokenizer
        self.tools = tools

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """The chat template's prompt ids (tools: rendered by the template); ValueError for
        no messages or an unknown role."""
        if not messages:
            raise ValueError("messages must not be empty")
        for m in messages:
            if m["role"] not in CHAT_ROLES:
                raise ValueError(f"unknown role {m['role']!r}: use one of {', '.join(CHAT_ROLES)}")
        return chat_prompt_ids(self.tokenizer, messages, tools)

    async def in_session(
        self, sp: SessionParams | None, prompt_ids: list[int], whole: bool = False
    ) -> tuple[list[int], SessionRef | None]:
        """The prompt of a session's request: the session's tokens (its request `rid`, cut at
        `offset`) then prompt_ids; whole: prompt_ids are the whole prompt (OpenAI routes),
        only checked against the session. ValueError for no such session."""
        if sp is None:
            return prompt_ids, None
        offset = 0 if whole else sp.offset
        rid = None if whole else sp.rid
        before = await self.backend.session_context(sp.id, rid, offset, len(prompt_ids))
        return before + prompt_ids, SessionRef(sp.id, sp.replace)

    async def validate(
        self, prompt_ids: list[int], params: SamplingParams, session: SessionRef | None = None
    ) -> Checked:
        """The request checked, once, by the backend (ValueError, Overloaded), off the event
        loop: a grammar may compile. Before a reply starts, so a bad request never gets a
        200; what serves it then trusts the Checked request."""
        checked = await asyncio.to_thread(self.backend.validate, prompt_ids, params)
        return checked if session is None else replace(checked, session=session)

    async def events(
        self, request: Checked, endpoint: str, rid: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        """One generation's events, each counted in the metrics (time to first token, and the
        request's latency and tokens at its end). Closing it aborts the request."""
        start, ttft = time.monotonic(), None
        async with aclosing(self.backend.generate(request, rid)) as gen:
            async for ev in gen:
                self.metrics.observe_event(ev)
                if ttft is None and ev.token_ids:
                    ttft = time.monotonic() - start
                    self.metrics.ttft.observe(ttft)
                if ev.finish_reason is not None:
                    self.metrics.record(endpoint, ev, time.monotonic() - start, ttft)
                yield ev

    async def interleaved(
        self, runs: list[Checked], endpoint: str, rid: str | None = None
    ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """(i, event) of each generation as its events come (OpenAI `n`). One generation's
        pass straight through (no task in between); several are pumped by a task each into
        one queue. Closing it aborts all. rid names a single generation only."""
        if len(runs) == 1:
            async with aclosing(self.events(runs[0], endpoint, rid)) as gen:
                async for ev in gen:
                    yield 0, ev
            return
        events: asyncio.Queue[tuple[int, RequestOutput | None]] = asyncio.Queue()

        async def pump(i: int, request: Checked) -> None:
            try:
                async with aclosing(self.events(request, endpoint)) as gen:
                    async for ev in gen:
                        await events.put((i, ev))
            finally:
                await events.put((i, None))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(runs)]
        try:
            running = len(tasks)
            while running:
                i, got = await events.get()
                if got is None:
                    running -= 1
                else:
                    yield i, got
            for t in tasks:
                t.result()  # a generation that raised (e.g. ValueError) surfaces here
        finally:
            for t in tasks:
                t.cancel()

    async def collect(self, request: Checked, endpoint: str, rid: str | None = None) -> Collected:
        text: list[str] = []
        ids: list[int] = []
        logprobs: list[tuple[int, float, dict[int, float]]] = []
        input_lps: list[float | None] = []
        last: RequestOutput | None = None
        async with aclosing(self.events(request, endpoint, rid)) as events:
            async for ev in events:
                text.append(ev.text)
                ids.extend(ev.token_ids)
                input_lps.extend(ev.input_logprobs or [])
                if ev.logprobs is not None:
                    for i, t in enumerate(ev.token_ids):
                        top = ev.top_logprobs[i] if ev.top_logprobs else {}
                        logprobs.append((t, ev.logprobs[i], top))
                last = ev
        assert last is not None and last.finish_reason is not None
        last.input_logprobs = input_lps
        return Collected("".join(text), ids, last, logprobs)
