"""WorkerRegistry: the workers that said, recently enough, that they serve (discovery).

Each worker renews its entry with a heartbeat before its TTL runs out; an entry not renewed
in time is gone, so a worker that dies or hangs leaves routing by itself, and one that
stops cleanly leaves at once (TTL 0). Kept by the cache service; pure Python.

A registry that has just started (a restarted cache service) does not yet know every worker:
for its first SETTLE_S it says so (`settling`), and names the workers that left cleanly
or expired meanwhile, so that a gateway keeps the workers it routes to and drops only those.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

ROLES = ("prefill", "decode")
# a worker re-registers within its heartbeat (1 s) plus its channel's reconnect backoff (at
# most 2 s, services/grpcio.py): a registry this young may still miss some
SETTLE_S = 5.0


@dataclass(frozen=True)
class Registered:
    address: str
    role: str
    age: float  # seconds since its first registration


@dataclass(frozen=True)
class Snapshot:
    live: list[Registered]
    settling: bool  # up for less than SETTLE_S: live workers may be missing
    gone: list[str]  # while settling, the workers that left (TTL 0) or expired


class WorkerRegistry:
    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self._entries: dict[str, tuple[str, float, float]] = {}  # address -> role, since, until
        self._gone: set[str] = set()  # left or expired while settling
        self._lock = threading.Lock()

    def beat(self, address: str, role: str, ttl: float) -> None:
        """Register or renew; ValueError for an entry that cannot be routed to."""
        if not address or ":" not in address:
            raise ValueError(f"a worker registers as host:port, not {address!r}")
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if not 0 <= ttl <= 3600:
            raise ValueError("ttl_s must be in [0, 3600]")
        now = self.clock()
        with self._lock:
            if ttl == 0:
                self._entries.pop(address, None)
                self._forget([address], now)
                return
            self._gone.discard(address)
            old = self._entries.get(address)
            since = old[1] if old is not None and old[0] == role else now
            self._entries[address] = (role, since, now + ttl)

    def live(self) -> list[Registered]:
        """The entries whose TTL has not run out (the others are dropped), by address."""
        now = self.clock()
        with self._lock:
            gone = [a for a, (_, _, until) in self._entries.items() if until <= now]
            for a in gone:
                del self._entries[a]
            self._forget(gone, now)
            return [
                Registered(a, role, now - since)
                for a, (role, since, _) in sorted(self._entries.items())
            ]

    def snapshot(self) -> Snapshot:
        live = self.live()
        with self._lock:
            return Snapshot(live, self._settling(self.clock()), sorted(self._gone))

    def _settling(self, now: float) -> bool:
        if now - self.started < SETTLE_S:
            return True
        self._gone.clear()
        return False

    def _forget(self, addresses: list[str], now: float) -> None:
        if self._settling(now):
            self._gone.update(addresses)
