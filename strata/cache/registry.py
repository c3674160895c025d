"""WorkerRegistry: the workers that said, recently enough, that they serve (discovery).

Each worker renews its entry with a heartbeat before its TTL runs out; an entry not renewed
in time is gone, so a worker that dies or hangs leaves routing by itself, and one that
stops cleanly leaves at once (TTL 0). Kept by the cache service; pure Python.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class Registered:
    address: str
    role: str
    age: float  # seconds since its first registration


class WorkerRegistry:
    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._entries: dict[str, tuple[str, float, float]] = {}  # address -> role, since, until
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
                return
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
            return [
                Registered(a, role, now - since)
                for a, (role, since, _) in sorted(self._entries.items())
            ]
