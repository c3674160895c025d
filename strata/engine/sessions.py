"""Sessions: a conversation whose KV the engine keeps on purpose (SGLang's open_session /
close_session and `session_params`).

A session remembers the whole token sequence (prompt + output) of its last few requests, so
a request may continue one of them (`rid`, default the newest, cut at `offset`) with only
its new tokens. When a request of the session finishes, the session pins its newest prefix in
the radix cache: the path is locked, so L1 eviction passes it by. The pins of all sessions
together stay within `budget_pages`; past it, the least recently used session's pin is
released, and its pages then leave L1 like any cached page: down to L2 and L3 where those
tiers are on, not dropped. Closing a session, or its TTL (renewed by each request) running
out, releases its pin; an engine never holds a page for a session past either.
"""

from __future__ import annotations

import time
import uuid
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TTL = 600.0  # seconds a session lives after its last request
KEEP_CONTEXTS = 8  # request sequences a session remembers (for rid / offset)
MAX_SESSIONS = 4096


@dataclass
class Session:
    id: str
    ttl: float
    capacity: int | None  # tokens a request's whole sequence may reach (None: the context)
    expires: float
    # rid -> its tokens, 4 bytes each (a list of ints would take 36)
    contexts: OrderedDict[str, array] = field(default_factory=OrderedDict)
    node: int | None = None  # the pinned node: its path is locked in the radix cache
    pinned_pages: int = 0


class Sessions:
    """The engine's open sessions (engine thread only). cache: the prefix cache (None: no
    cache, so nothing is pinned)."""

    def __init__(
        self,
        cache: Any,
        page_size: int,
        budget_pages: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache, self.page_size, self.budget_pages = cache, page_size, budget_pages
        self.clock = clock
        self._open: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._next_scan = 0.0  # expire() looks at every session at most once a second

    def open(self, ttl: float | None = None, capacity: int | None = None) -> str:
        ttl = DEFAULT_TTL if ttl is None else ttl
        if not 0 < ttl <= 7 * 86400:
            raise ValueError("a session's timeout must be in (0, 604800] seconds")
        if capacity is not None and capacity <= 0:
            raise ValueError("capacity_of_str_len must be positive")
        if len(self._open) >= MAX_SESSIONS:
            raise ValueError(f"{MAX_SESSIONS} sessions are open: close one first")
        sid = uuid.uuid4().hex
        self._open[sid] = Session(sid, ttl, capacity, self.clock() + ttl)
        return sid

    def close(self, sid: str) -> bool:
        s = self._open.pop(sid, None)
        if s is None:
            return False
        self._unpin(s)
        return True

    def get(self, sid: str) -> Session:
        s = self._open.get(sid)
        if s is None or s.expires <= self.clock():
            raise ValueError(f"session {sid!r} is not open (closed, expired or never opened)")
        return s

    def context(
        self, sid: str, rid: str | None = None, offset: int | None = None, new: int = 0
    ) -> list[int]:
        """The tokens a request of the session continues: request rid's sequence (default
        the newest; none before the first), cut at offset (negative: from the end); new:
        the request's own tokens, checked with it against the session's capacity."""
        s = self.get(sid)
        if rid is None:
            ids = next(reversed(s.contexts.values())) if s.contexts else array("I")
        elif rid in s.contexts:
            ids = s.contexts[rid]
        else:
            raise ValueError(
                f"session {sid!r} has no request {rid!r} (it keeps the last {KEEP_CONTEXTS})"
            )
        if offset is not None:
            if not -len(ids) <= offset <= len(ids):
                raise ValueError(f"offset {offset} is outside the {len(ids)} tokens of the request")
            ids = ids[:offset]
        if s.capacity is not None and len(ids) + new > s.capacity:
            raise ValueError(
                f"the session's sequence would reach {len(ids) + new} tokens, past its "
                f"capacity_of_str_len of {s.capacity}"
            )
        return list(ids)

    def finished(self, sid: str, rid: str, tokens: Sequence[int], replace: bool, ok: bool) -> None:
        """A request of the session ended with these tokens (prompt + output): remember them
        and, when it ended well, pin the prefix the cache now holds for them."""
        s = self._open.get(sid)
        if s is None:
            return  # closed (or expired) while the request ran
        s.expires = self.clock() + s.ttl
        self._open.move_to_end(sid)
        if not ok:
            return
        if replace:
            s.contexts.clear()
        s.contexts[rid] = array("I", tokens)
        while len(s.contexts) > KEEP_CONTEXTS:
            s.contexts.popitem(last=False)
        self._pin(s, tokens)

    def expire(self) -> int:
        """Close the sessions whose TTL ran out; how many. (A session past its TTL is refused
        at once by `get`; its pin goes within a second.)"""
        now = self.clock()
        if now < self._next_scan:
            return 0
        self._next_scan = now + 1.0
        gone = [sid for sid, s in self._open.items() if s.expires <= now]
        for sid in gone:
            self.close(sid)
        return len(gone)

    def stats(self) -> dict[str, int]:
        return {
            "open": len(self._open),
            "pinned_pages": sum(s.pinned_pages for s in self._open.values()),
            "budget_pages": self.budget_pages,
        }

    def _pin(self, s: Session, tokens: Sequence[int]) -> None:
        if self.cache is None:
            return
        m = self.cache.match(tokens)
        self._unpin(s)
        if m.length == 0:
            return
        self.cache.lock(m.node)
        s.node, s.pinned_pages = m.node, m.length // self.page_size
        over = sum(x.pinned_pages for x in self._open.values()) - self.budget_pages
        for other in list(self._open.values()):  # least recently used first
            if over <= 0:
                break
            if other is not s:
                over -= other.pinned_pages
                self._unpin(other)  # its pages stay cached; they may now leave L1 (to L2, L3)

    def _unpin(self, s: Session) -> None:
        if s.node is not None and self.cache is not None:
            self.cache.unlock(s.node)
        s.node, s.pinned_pages = None, 0
