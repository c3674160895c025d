"""TierMover: copies pages between the tiers (L1 device, L2 host, L3 files).

Demotions and backups (L1 -> L2) run on the engine thread: a page must be copied before its
L1 page is reused, and a CPU page copy costs tens of microseconds. Loads (L2 -> L1, and
L3 -> L2 -> L1) run on one side thread while the engine keeps stepping; L3 writes run on
another. On CUDA the L2 pool is pinned and copies go on a copy stream, synchronized before
anyone may read or reuse the pages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from strata.kv.pool import KVCache
from strata.kv.store import PageStore

log = logging.getLogger(__name__)
# NOTE: L3 writes queue cloned page bytes; past this many pending bytes new writes are
# skipped (counted) rather than letting a slow disk grow the process without bound.
MAX_PENDING_WRITE_BYTES = 512 << 20


@dataclass
class LoadPlan:
    """Pages to bring into L1 for tokens[start:end], from L2 or from the L3 store."""

    source: str  # "l2" | "l3"
    tokens: list[int]  # the prefix up to the last loaded page
    start: int  # tokens[:start] are cached when the load begins (and stay: lock_node)
    pages: list[int]  # L1 destination pages
    host: list[int]  # L2 pages: the source (l2), or where files are staged (l3, device L1)
    keys: list[bytes]  # l3: the page keys to read
    lock_node: int  # pins tokens[:start] (and the L2 source pages) until the plan ends
    loaded: int = 0  # pages that landed (l3: up to the first missing or bad file)
    seconds: float = 0.0
    owner: object = None  # whoever waits for it (a request)
    done: threading.Event = field(default_factory=threading.Event)


def page_bytes(kv: KVCache) -> np.ndarray:
    """A CPU pool's pages as uint8 numpy rows [pages, bytes_per_page] (no copy)."""
    assert kv.data.device.type == "cpu"
    return kv.data.view(kv.data.shape[0], -1).view(torch.uint8).numpy()


class TierMover:
    def __init__(
        self,
        l1: KVCache,
        l2: KVCache,
        store: PageStore | None,
        on_loaded: Callable[[LoadPlan], None],
        on_written: Callable[[bytes, int], None],
    ) -> None:
        self.l1, self.l2, self.store = l1, l2, store
        self.on_loaded, self.on_written = on_loaded, on_written
        self.cuda = l1.data.is_cuda
        self._stream = torch.cuda.Stream(l1.data.device) if self.cuda else None
        self._l1 = None if self.cuda else page_bytes(l1)
        self._l2 = page_bytes(l2)
        self._loads = ThreadPoolExecutor(1, thread_name_prefix="strata-load")
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="strata-l3-write")
        self._lock = threading.Lock()
        self.pending_write_bytes = 0
        self.moved = dict.fromkeys(("l1_to_l2", "l2_to_l1", "l2_to_l3", "l3_to_l1"), 0)
        self.skipped_writes = 0

    # ---- engine thread -------------------------------------------------------------------

    def to_host(self, pages: Sequence[int], host: Sequence[int]) -> None:
        """Copy L1 pages into L2 pages; done when it returns."""
        self._device_to_host(pages, host)
        self._count("l1_to_l2", len(pages) * self.l1.bytes_per_page)

    def time_load(self, pages: Sequence[int]) -> float:
        """Seconds an L2 -> L1 page copy takes, timed at start on L1 pages nobody holds yet
        (copied down to the same L2 page ids and back, so nothing changes): the fastest of
        three tries (the first touches fresh memory; a busy machine may preempt one)."""
        seconds = float("inf")
        for _ in range(3):
            self._device_to_host(pages, pages)
            start = time.perf_counter()
            self._host_to_device(pages, pages)
            seconds = min(seconds, time.perf_counter() - start)
        return seconds / max(1, len(pages))

    def _device_to_host(self, pages: Sequence[int], host: Sequence[int]) -> None:
        if self.cuda:
            assert self._stream is not None
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                for p, h in zip(pages, host):
                    self.l2.data[h].copy_(self.l1.data[p], non_blocking=True)
            self._stream.synchronize()
        else:
            assert self._l1 is not None
            for p, h in zip(pages, host):
                np.copyto(self._l2[h], self._l1[p])

    def from_host(self, host: Sequence[int], pages: Sequence[int]) -> None:
        """Copy L2 pages into L1 pages; done when it returns."""
        self._host_to_device(host, pages)
        self._count("l2_to_l1", len(pages) * self.l1.bytes_per_page)

    def submit(self, plan: LoadPlan) -> None:
        fut = self._loads.submit(self._load, plan)
        fut.add_done_callback(lambda f: self._loaded(plan, f.exception()))

    def write(self, keys: Sequence[bytes], host: Sequence[int]) -> None:
        """Queue L3 writes of L2 pages (their bytes are copied now: the pages may be reused
        before the writer gets to them)."""
        if self.store is None or not keys:
            return
        nbytes = len(keys) * self.l2.bytes_per_page
        with self._lock:
            if self.pending_write_bytes + nbytes > MAX_PENDING_WRITE_BYTES:
                self.skipped_writes += len(keys)
                return
            self.pending_write_bytes += nbytes
        data = self._l2[list(host)]  # fancy indexing copies
        self._writes.submit(self._write, list(keys), data, nbytes)

    def hold(self, keys: Sequence[bytes], priority: int, ttl: float) -> None:
        """Queue a retention hold on the store's pages (after the writes queued before it)."""
        if self.store is not None and keys:
            self._writes.submit(self.store.hold, list(keys), priority, ttl)

    def shutdown(self) -> None:
        self._loads.shutdown(wait=False, cancel_futures=True)
        self._writes.shutdown(wait=True)
        if self.store is not None:
            self.store.close()

    # ---- side threads --------------------------------------------------------------------

    def _load(self, plan: LoadPlan) -> None:
        start = time.perf_counter()
        n = len(plan.pages)
        if plan.source == "l3":
            n = self._read_files(plan)
            if plan.host:  # staged in pinned L2 pages for a device L1
                self._host_to_device(plan.host[:n], plan.pages[:n])
            self._count("l3_to_l1", n * self.l1.bytes_per_page)
        else:
            self._host_to_device(plan.host, plan.pages)
            self._count("l2_to_l1", n * self.l1.bytes_per_page)
        plan.loaded = n
        plan.seconds = time.perf_counter() - start

    def _read_files(self, plan: LoadPlan) -> int:
        """Read the plan's pages from the store into its pages; how many leading ones landed."""
        assert self.store is not None
        if plan.host:
            dests = [self._l2[h] for h in plan.host]
        else:
            assert self._l1 is not None
            dests = [self._l1[p] for p in plan.pages]
        return self.store.read_many(plan.keys, dests)

    def _host_to_device(self, host: Sequence[int], pages: Sequence[int]) -> None:
        if self.cuda:
            assert self._stream is not None
            with torch.cuda.stream(self._stream):
                for h, p in zip(host, pages):
                    self.l1.data[p].copy_(self.l2.data[h], non_blocking=True)
            self._stream.synchronize()
        else:
            assert self._l1 is not None
            for h, p in zip(host, pages):
                np.copyto(self._l1[p], self._l2[h])

    def _loaded(self, plan: LoadPlan, exc: BaseException | None) -> None:
        if exc is not None:  # nothing landed: the caller recomputes
            log.error("KV load failed: %r", exc)
            plan.loaded = 0
        plan.done.set()
        self.on_loaded(plan)

    def _write(self, keys: list[bytes], data: np.ndarray, nbytes: int) -> None:
        assert self.store is not None
        try:
            for key, written in zip(keys, self.store.write_many(keys, list(data)), strict=True):
                if written is None:  # failed (logged by the store): the page stays unstored
                    continue
                if written:
                    self._count("l2_to_l3", written)
                self.on_written(key, written)
        finally:
            with self._lock:
                self.pending_write_bytes -= nbytes

    def _count(self, direction: str, nbytes: int) -> None:
        with self._lock:
            self.moved[direction] += nbytes
