"""KVEventPublisher: a worker's KV events to the cache service, off the engine's hot path.

The engine hands each step's events to `__call__` (a list append under a lock); a thread
sends them in batches, numbered in sequence, and a heartbeat when there are none. When the
service cannot apply a batch (it restarted, or a batch was lost) or cannot be reached, the
next successful call sends a snapshot of the tree, taken on the engine thread between
steps, and the events after it. The engine never waits for any of this.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

import grpc

from services.convert import batch_to_proto
from services.grpcio import open_channel
from strata.cache.mirror import Batch
from strata.cache.results import KVEvent
from strata.engine.engine import Engine
from strata.proto.v1 import cache_pb2_grpc

log = logging.getLogger(__name__)
MAX_BATCH = 4096  # events per message


class KVEventPublisher:
    def __init__(
        self,
        target: str,
        worker: str,
        engine: Engine,
        interval: float = 0.05,
        heartbeat: float = 1.0,
        timeout: float = 5.0,
    ) -> None:
        assert engine.prefix_cache is not None
        self.engine, self.cache, self.worker = engine, engine.prefix_cache, worker
        self.interval, self.heartbeat, self.timeout = interval, heartbeat, timeout
        self.channel = open_channel(target)
        self.stub = cache_pb2_grpc.CacheStub(self.channel)
        self._lock = threading.Lock()
        self._pending: deque[tuple[int, KVEvent]] = deque()
        self._seq = 0  # the seq of the next event (assigned on the engine thread)
        self._need_snapshot = True
        self._connected = False
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="strata-kv-events", daemon=True)
        self.snapshots = 0  # how many were sent (a restarted service needs one)

    def __call__(self, events: list[KVEvent]) -> None:
        """The engine's event sink (engine thread)."""
        with self._lock:
            for ev in events:
                self._pending.append((self._seq, ev))
                self._seq += 1
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)
        self.channel.close()

    def _run(self) -> None:
        backoff = self.interval
        while not self._stop.is_set():
            self._wake.wait(self.heartbeat)
            self._wake.clear()
            if self._stop.wait(self.interval):  # let a step's worth of events gather
                return
            try:
                if self._need_snapshot:
                    self._send_snapshot()
                self._send_pending()
                backoff = self.interval
                if not self._connected:
                    log.info("KV events: connected to the cache service")
                    self._connected = True
            except grpc.RpcError as exc:
                if self._connected:
                    log.warning("KV events: cache service unreachable (%s); serving on", exc.code())
                self._connected, self._need_snapshot = False, True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception:  # never let the thread die: the next round starts over
                log.exception("KV events: publishing failed")
                self._need_snapshot = True
                self._stop.wait(1.0)

    def _batch(self, first_seq: int, events: list[KVEvent], snapshot: bool = False) -> Batch:
        costs = getattr(self.cache, "costs", {})
        return Batch(
            self.worker,
            self.cache.tree.seed,
            self.cache.tree.page_size,
            first_seq,
            snapshot,
            events,
            {k: v for k, v in costs.items() if v},
            getattr(self.cache, "page_file_bytes", 0),
        )

    def _take_snapshot(self) -> tuple[int, dict[str, list[bytes]]]:
        with self._lock:  # on the engine thread: no event can be assigned meanwhile
            return self._seq, self.cache.snapshot()

    def _send_snapshot(self) -> None:
        seq, tiers = self.engine.call(self._take_snapshot).result(self.timeout)
        with self._lock:
            # events before the snapshot are in it, except the L3 ones (it has no L3)
            kept = [ev for s, ev in self._pending if s < seq and ev.tier == "l3"]
            while self._pending and self._pending[0][0] < seq:
                self._pending.popleft()
        events = [KVEvent("stored", tier, keys) for tier, keys in tiers.items() if keys]
        batch = self._batch(seq, events + kept, snapshot=True)
        self.stub.Publish(batch_to_proto(batch), timeout=self.timeout)
        self._need_snapshot = False
        self.snapshots += 1

    def _send_pending(self) -> None:
        while True:
            with self._lock:
                chunk = [self._pending[i] for i in range(min(MAX_BATCH, len(self._pending)))]
                first = chunk[0][0] if chunk else self._seq
            reply = self.stub.Publish(
                batch_to_proto(self._batch(first, [ev for _, ev in chunk])), timeout=self.timeout
            )
            if reply.need_snapshot:
                self._need_snapshot = True
                self._wake.set()
                return
            with self._lock:
                for _ in chunk:
                    self._pending.popleft()
            if len(chunk) < MAX_BATCH:
                return
