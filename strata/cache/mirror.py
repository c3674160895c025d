"""ClusterIndex: the cache service's view of every worker's radix tree, rebuilt from KV events.

Each worker's tree is authoritative; a mirror holds the page keys the worker has in L1 and
in L2, applies the worker's events in sequence order and asks for a snapshot when it cannot
(it started after the worker, or an event batch went missing). Routing needs no tree here:
a prompt's page keys form a chain, and a worker holds the prefix up to the first key it
lacks. The shared L3 store is indexed once for the cluster (an `L3Index`), from the
directory at start and from the workers' l3 events after.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from strata.cache.keys import page_keys
from strata.cache.results import KVEvent

if TYPE_CHECKING:
    from strata.kv.store import L3Index

# NOTE: a worker not heard from for this long (its publisher sends at least a heartbeat a
# second) is left out of routing until it speaks again.
STALE_SECONDS = 10.0


@dataclass
class Mirror:
    seed: bytes
    page_size: int
    next_seq: int
    tiers: dict[str, set[bytes]] = field(default_factory=lambda: {"l1": set(), "l2": set()})
    costs: dict[str, float] = field(default_factory=dict)
    seen: float = field(default_factory=time.monotonic)


class WorkerRoute(NamedTuple):
    l1_tokens: int  # leading tokens of the prompt in the worker's L1
    l2_tokens: int  # leading tokens in its L1 or L2
    costs: dict[str, float]  # measured seconds: compute_token, l2_page, l3_page
    page_size: int


class Batch(NamedTuple):
    worker: str
    seed: bytes
    page_size: int
    first_seq: int  # seq of events[0]; for a snapshot, the seq of the next event
    snapshot: bool
    events: list[KVEvent]
    costs: dict[str, float]
    page_file_bytes: int


class ClusterIndex:
    def __init__(self, store: L3Index | None = None) -> None:
        self.mirrors: dict[str, Mirror] = {}
        self.store = store
        self._lock = threading.Lock()  # the gRPC server calls from several threads

    def apply(self, b: Batch) -> bool:
        """Apply one batch; False when the worker must send a snapshot first."""
        with self._lock:
            m = self.mirrors.get(b.worker)
            if b.snapshot:
                m = self.mirrors[b.worker] = Mirror(b.seed, b.page_size, b.first_seq)
            elif m is None or m.next_seq != b.first_seq or m.seed != b.seed:
                return False
            m.seen, m.costs = time.monotonic(), b.costs
            for ev in b.events:
                self._apply_event(m, ev, b.page_file_bytes)
            if not b.snapshot:
                m.next_seq += len(b.events)
            return True

    def route(self, tokens: Sequence[int]) -> tuple[dict[str, WorkerRoute], int]:
        """Per live worker, how much of the prompt it holds in L1 and in L1 + L2; and how
        much the L3 store holds."""
        now = time.monotonic()
        keys: dict[tuple[bytes, int], list[bytes]] = {}
        out: dict[str, WorkerRoute] = {}
        l3 = 0
        with self._lock:
            for worker, m in self.mirrors.items():
                if now - m.seen > STALE_SECONDS:
                    continue
                chain = keys.get((m.seed, m.page_size))
                if chain is None:
                    chain = keys[(m.seed, m.page_size)] = page_keys(m.seed, tokens, m.page_size)
                    if self.store is not None:
                        l3 = max(l3, self.store.count_present(chain) * m.page_size)
                ps = m.page_size
                n1 = _leading(chain, m.tiers["l1"])
                n2 = n1 + _leading(chain[n1:], m.tiers["l1"], m.tiers["l2"])
                out[worker] = WorkerRoute(n1 * ps, n2 * ps, dict(m.costs), ps)
        return out, l3

    def stats(self) -> dict[str, dict[str, float]]:
        now = time.monotonic()
        with self._lock:
            return {
                w: {
                    "l1_pages": len(m.tiers["l1"]),
                    "l2_pages": len(m.tiers["l2"]),
                    "next_seq": m.next_seq,
                    "seconds_since_seen": now - m.seen,
                }
                for w, m in self.mirrors.items()
            }

    def _apply_event(self, m: Mirror, ev: KVEvent, page_file_bytes: int) -> None:
        if ev.tier in m.tiers:
            if ev.kind == "stored":
                m.tiers[ev.tier].update(ev.keys)
            elif ev.kind == "removed":
                m.tiers[ev.tier].difference_update(ev.keys)
        elif ev.tier == "l3" and self.store is not None:
            if ev.kind == "stored":
                for key in ev.keys:
                    self.store.add(key, page_file_bytes)
            elif ev.kind == "hit":
                self.store.touch(ev.keys)
            elif ev.kind == "removed":
                self.store.remove(ev.keys)
            elif ev.kind == "held":
                self.store.hold(ev.keys, ev.priority, ev.ttl)


def _leading(chain: list[bytes], *tiers: set[bytes]) -> int:
    """How many leading keys of chain are in any of the tiers."""
    n = 0
    for key in chain:
        if not any(key in t for t in tiers):
            break
        n += 1
    return n
