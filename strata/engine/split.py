"""The engine's two split-mode roles.

Prefill role: a request submitted with `hold` keeps its pages after its first token, until
`release_held` (the pages were sent to a decode worker) or a timeout (nobody pulled them).

Decode role: a request submitted with a `kv_source` is admitted by reserving pages for its
whole prompt; the source runs on a side thread (it asks a prefill worker to compute the
prompt and receives the KV into those pages), and when it returns the request continues
with the first token like any other. An abort while it runs keeps the pages reserved until
it ends, so a transfer never writes into pages given to someone else.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from strata.engine.intake import Inbox, RequestTable
from strata.engine.outputs import Outputs
from strata.engine.request import RemoteFill, Request
from strata.engine.runner import ModelRunner
from strata.engine.scheduler import Scheduler
from strata.sampling.sampler import skip_draw

log = logging.getLogger(__name__)


class SplitRoles:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        table: RequestTable,
        inbox: Inbox,
        outputs: Outputs,
        hold_timeout: float,
    ) -> None:
        self.runner, self.scheduler, self.table, self.inbox = runner, scheduler, table, inbox
        self.outputs = outputs
        self._fetchers: ThreadPoolExecutor | None = None  # run kv_source calls
        self.held: dict[str, tuple[Request, float]] = {}  # rid -> (request, expiry)
        self.hold_timeout = hold_timeout
        self._next_expiry_check = 0.0

    def hold(self, req: Request) -> None:
        """A finished prefill keeps its pages until pulled, or until hold_timeout."""
        self.held[req.rid] = (req, time.monotonic() + self.hold_timeout)

    def abort_now(self, rid: str) -> bool:
        """On the engine thread (through `call`): abort a request or release a held one;
        False when neither exists."""
        req = self.table.by_id.get(rid)
        if req is not None:
            self.outputs.finish(req, "abort")
        return self.release_held(rid) or req is not None

    def held_pages(self, rid: str) -> list[int]:
        """The prompt pages of a held request (prefill role); KeyError if none is held."""
        req, _ = self.held[rid]
        return req.pages[: self.runner.pages_for(len(req.prompt_ids))]

    def release_held(self, rid: str) -> bool:
        """Give a held request's pages back (to the cache, when it is on)."""
        held = self.held.pop(rid, None)
        if held is not None:
            self.scheduler.release(held[0])
        return held is not None

    def expire_held(self) -> None:
        """Release held pages nobody pulled in time (the decode worker went away)."""
        if not self.held:  # the common case (every decode step): no clock read
            return
        now = time.monotonic()
        if now < self._next_expiry_check:
            return
        self._next_expiry_check = now + 1.0
        for rid in [rid for rid, (_, expiry) in self.held.items() if expiry < now]:
            log.warning(
                "request %s: pages held %.0fs with no pull; released", rid, self.hold_timeout
            )
            self.release_held(rid)

    def start_fetch(self, req: Request) -> None:
        """Run a remote request's kv_source on a side thread; on_fetched when it ends."""
        if self._fetchers is None:
            self._fetchers = ThreadPoolExecutor(16, thread_name_prefix="strata-kv")
        assert req.kv_source is not None
        cancel = req.cancel = threading.Event()
        fut = self._fetchers.submit(req.kv_source, list(req.pages), cancel)
        fut.add_done_callback(lambda f: self.inbox.put(("fetched", (req, f))))

    def close(self) -> None:
        if self._fetchers is not None:
            self._fetchers.shutdown(wait=False, cancel_futures=True)

    def on_fetched(self, req: Request, fut: Future) -> None:
        req.kv_source = None  # no longer awaiting its KV
        if req.finished:  # aborted while the transfer ran: its pages are free to go now
            self.scheduler.release(req)
            return
        try:
            fill: RemoteFill = fut.result()
        except Exception as exc:
            self.outputs.finish(req, "error", error=str(exc) or repr(exc))
            return
        self.scheduler.remote_filled(req, fill.cached_tokens, (fill.l2_tokens, fill.l3_tokens))
        if req.generator is not None and not req.params.greedy:
            skip_draw(req.generator)  # drawn by the prefill worker
        req.transfer = (fill.transfer_bytes, fill.transfer_seconds)
        self.outputs.on_token(req, fill.token, fill.logprob, fill.top_logprobs)
