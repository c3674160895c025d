"""TieredCache: the radix cache over three tiers, L1 (the device pool), L2 (a host pool) and
L3 (page files shared by the cluster).

- An L1 page leaving L1 is demoted to L2 (copied, unless it has an L2 copy already), and
  an L2 page leaving L2 is written to L3 (unless its file exists) before it is dropped.
- Write policy (SGLang's names): `write_through` copies every page into L2 (and L3) when
  the tree takes it; `write_through_selective` when its prefix has been reused twice;
  `write_back` only when it is evicted. A page with an L2 copy leaves L1 for free.
- A prefix found in L2, or continued by files in L3, is loaded into L1 by a `LoadPlan` on
  the mover's thread while the engine keeps stepping; `finish_load` hands the pages to the
  tree on the engine thread. L3 is skipped when loading would cost more than recomputing.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

from strata.cache.index import CacheIndex, RadixCache
from strata.cache.results import KVEvent
from strata.cache.tree import RadixTree
from strata.config import WRITE_POLICIES, HiCacheConfig
from strata.kv.mover import LoadPlan, TierMover
from strata.kv.pool import KVCache, PagePool, alloc_evicting
from strata.kv.store import HEADER_BYTES, FileStore, PageFormat, PageStore, StoreIndex

SELECTIVE_HITS = 2  # write_through_selective: copy a prefix down once it is reused this often
# NOTE: a load makes its request wait at least one engine step; below this many tokens an
# L3 hit is recomputed instead.
MIN_L3_TOKENS = 64
EMA = 0.2  # weight of the newest measurement in the cost averages
CALIBRATION_PAGES = 8  # L1 -> L2 -> L1 page copies timed at start (see TieredCache.costs)


class TieredCache(CacheIndex):
    def __init__(
        self,
        l1: KVCache,
        pool: PagePool,
        host_pages: int,
        write_policy: str = "write_through",
        seed: bytes = b"",
        store: PageStore | None = None,
        store_index: StoreIndex | None = None,
        on_loaded: Callable[[LoadPlan], None] = lambda plan: None,
        record_events: bool = False,
        l2: KVCache | None = None,
    ) -> None:
        """l2: the L2 pool when it is the tail of l1's tensor (KVCache.rows), so the kernels
        can read an L2 page in place (the CPU; see l2_base); None: a pool of its own."""
        if write_policy not in WRITE_POLICIES:
            raise ValueError(
                f"unknown write policy {write_policy!r}; choose one of {WRITE_POLICIES}"
            )
        self.tree = RadixTree(l1.page_size, seed, record_events)
        self.page_size = l1.page_size
        self.l1, self.pool = l1, pool
        self.l2 = l2 if l2 is not None else l1.like(host_pages, "cpu", l1.data.is_cuda)
        self.host_pool = PagePool(self.l2.data.shape[0])
        # the id the kernels read L2 page 0 at (past L1's pages), when they can
        self.l2_base = pool.num_pages if l2 is not None else None
        self.policy = write_policy
        self.store, self.index = store, store_index
        self.mover = TierMover(l1, self.l2, store, on_loaded, self._written)
        self._lock = threading.Lock()  # guards _l3_events (written on the writer thread)
        self._l3_events: list[KVEvent] = []
        self.record_events = record_events
        # measured costs (seconds), None until seen: per prefill token, per page loaded
        self.costs: dict[str, float | None] = {
            "compute_token": None,
            "l2_page": None,
            "l3_page": None,
        }
        # NOTE: L2 is priced before its first load, so that routing never prefers another
        # worker's L3 (a store read plus a host copy) over this worker's L2 for want of a figure
        calibrate = range(min(CALIBRATION_PAGES, pool.num_pages, self.host_pool.num_pages))
        if len(calibrate):
            self.costs["l2_page"] = self.mover.time_load(list(calibrate))

    # ---- the CacheIndex surface ----------------------------------------------------------

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> int:
        existing = self.tree.insert(tokens, pages)
        if self.policy == "write_through" and len(tokens) > existing:
            self._backup(self.tree.match_prefix(tokens).node)
        return existing

    def prioritize(self, tokens: Sequence[int], priority: int, ttl: float) -> None:
        """Hold the cached prefix of tokens at a retention priority for ttl seconds: in L1
        and L2 (the tree) and in L3, the store's pages whether written yet or not (a file
        store's index, here or in the cache service through a "held" event; Redis itself)."""
        super().prioritize(tokens, priority, ttl)
        if self.store is None:
            return
        keys = self.tree.keys_of(tokens[: len(tokens) // self.page_size * self.page_size])
        self.mover.hold(keys, priority, ttl)
        if self.index is not None:
            self.index.hold(keys, priority, ttl)
        if self.record_events and keys:
            with self._lock:
                self._l3_events.append(KVEvent("held", "l3", keys, priority, ttl))

    def record_hit(self, node: int) -> None:
        self.tree.record_hit(node)
        if self.policy == "write_through_selective":
            self._backup(node, SELECTIVE_HITS)

    def evict(self, num_pages: int) -> list[int]:
        evicted = self.tree.evict(num_pages, self.copy_down)
        self.host_pool.free(evicted.host_pages)
        return evicted.pages

    def flush(self) -> list[int]:
        evicted = self.tree.flush()
        self.host_pool.free(evicted.host_pages)
        return evicted.pages

    def plan_loads(self, tokens: Sequence[int]) -> list[LoadPlan]:
        """Plans for the prefix past L1: its L2 part, then the pages that follow it in L3.
        Each plan holds a lock on what it builds on and owns its destination pages."""
        ps = self.page_size
        usable = (len(tokens) - 1) // ps  # NOTE: the last token is always computed
        m = self.tree.match_prefix(tokens)
        have, base = m.length // ps, m.host_node or m.node
        plans = []
        n2 = min(len(m.host_pages), usable - have)
        if n2 > 0:
            plan = self._plan("l2", tokens, have, m.host_pages[:n2], [], base)
            if plan is None:
                return []
            plans.append(plan)
        start = have + len(m.host_pages)
        if self.store is not None and start < usable:
            keys = self.tree.keys_of(tokens[: usable * ps])[start:]
            n3 = self.store.count_present(keys)
            if n3 and self._l3_pays(n3):
                plan = self._plan("l3", tokens, start, None, keys[:n3], base)
                if plan is not None:
                    plans.append(plan)
        for plan in plans:  # NOTE: completions reach the engine thread through its inbox
            self.mover.submit(plan)
        return plans

    def finish_load(self, plan: LoadPlan) -> None:
        ps, n = self.page_size, plan.loaded
        l3 = plan.source == "l3"
        if n:
            staged = plan.host[:n] if l3 and plan.host else None
            got = self.tree.attach(
                plan.tokens[: plan.start + n * ps], plan.start, plan.pages[:n], staged
            )
            self.pool.free(got.pages)
            if l3:
                self.host_pool.free(got.host_pages)
            self._measure(f"{plan.source}_page", plan.seconds / n)
        self.pool.free(plan.pages[n:])
        if l3:
            self.host_pool.free(plan.host[n:])
            assert self.store is not None
            self._l3_used(plan.keys[:n])
            gone = [k for k in plan.keys[n : n + 1] if not self.store.has(k)]
            self._l3_gone(gone)
        self.tree.unlock(plan.lock_node)

    def give_back(self, node: int) -> tuple[int, list[int]]:
        """The caller (sole holder of the deepest pages of node's path) takes them back
        from the tree (RadixTree.give_back); returns (the node it now locks, the pages)."""
        node, taken, host = self.tree.give_back(node)
        self.host_pool.free(host)
        return node, taken

    def copy_down(self, pages: list[int]) -> list[int] | None:
        """Copy L1 pages into new L2 pages (evicting cached L2 pages if needed) and return
        them, or None when L2 has no room. The caller owns them (host_pool.free)."""
        host = alloc_evicting(self.host_pool, len(pages), self._evict_host)
        if host is not None:
            self.mover.to_host(pages, host)
        return host

    def take_events(self) -> list[KVEvent]:
        events = self.tree.take_events()
        with self._lock:
            events, self._l3_events = events + self._l3_events, []
        return events

    def observe_compute(self, tokens: int, seconds: float) -> None:
        """A forward pass of mostly prefill: its cost per token (for the L3 decision)."""
        self._measure("compute_token", seconds / tokens)

    def tier_stats(self) -> dict[str, Any]:
        bpp = self.l1.bytes_per_page
        l1_used = self.pool.num_pages - self.pool.num_free
        stats: dict[str, Any] = {
            "l1": {
                "pages": self.pool.num_pages,
                "used_pages": l1_used,
                "cached_pages": self.tree.cached_pages,
                "bytes": l1_used * bpp,
            },
            "l2": {
                "pages": self.host_pool.num_pages,
                "used_pages": self.host_pool.num_pages - self.host_pool.num_free,
                "cached_pages": self.tree.host_pages,
                "bytes": (self.host_pool.num_pages - self.host_pool.num_free) * bpp,
            },
            "l3": None,
            "bytes_moved": dict(self.mover.moved),
            "write_policy": self.policy,
            "page_bytes": bpp,
        }
        if self.store is not None:
            stats["l3"] = {
                "pages": len(self.index) if self.index is not None else None,
                "bytes": self.index.total_bytes if self.index is not None else None,
                "bad_files": self.store.errors,
                "skipped_writes": self.mover.skipped_writes,
            }
        return stats

    def close(self) -> None:
        self.mover.shutdown()

    # ---- internals -----------------------------------------------------------------------

    def _plan(
        self,
        source: str,
        tokens: Sequence[int],
        have: int,
        host: list[int] | None,
        keys: list[bytes],
        base: int,
    ) -> LoadPlan | None:
        """Lock base, then take the plan's pages: L1 pages, and for files read through L2
        (host None, device L1) L2 pages. Taking them may evict others, never what base pins."""
        self.tree.lock(base)
        n = len(keys) if host is None else len(host)
        # NOTE: files are read straight into L1 pages in host memory; a device L1 is filled
        # through pinned L2 pages
        own_host = host is None and self.mover.cuda
        if own_host:
            host = alloc_evicting(self.host_pool, n, self._evict_host)
        elif host is None:
            host = []
        pages = alloc_evicting(self.pool, n, self.evict) if host is not None else None
        if pages is None:
            if own_host and host is not None:
                self.host_pool.free(host)
            self.tree.unlock(base)
            return None
        assert host is not None
        end = (have + n) * self.page_size
        return LoadPlan(source, list(tokens[:end]), have * self.page_size, pages, host, keys, base)

    def _backup(self, node: int, min_hits: int = 0) -> None:
        for node_id in self.tree.unbacked(node, min_hits):
            pages, keys = self.tree.pages_of(node_id)
            host = alloc_evicting(self.host_pool, len(pages), self._evict_host)
            if host is None:
                return
            self.mover.to_host(pages, host)
            self.tree.set_host(node_id, host)
            unstored = self._unstored(keys)
            self.mover.write(unstored, host[len(keys) - len(unstored) :])

    def _evict_host(self, num_pages: int) -> list[int]:
        freed = []
        for drop in self.tree.evict_host(num_pages):
            unstored = self._unstored(drop.keys) if drop.left_tree else []
            if unstored:  # its bytes are copied now, before the pages are reused
                self.mover.write(unstored, drop.host_pages[len(drop.keys) - len(unstored) :])
            freed.extend(drop.host_pages)
        return freed

    def _unstored(self, keys: list[bytes]) -> list[bytes]:
        """The trailing keys with no L3 file (the leading ones of a node are written first,
        so what is missing is a suffix)."""
        if self.store is None:
            return []
        n = self.store.count_present(keys)
        return keys[n:]

    def _l3_pays(self, pages: int) -> bool:
        if pages * self.page_size < MIN_L3_TOKENS:
            return False
        load, compute = self.costs["l3_page"], self.costs["compute_token"]
        return load is None or compute is None or load < compute * self.page_size

    def _written(self, key: bytes, nbytes: int) -> None:
        """On the writer thread: a page file exists now (nbytes 0: it was there already)."""
        if self.index is not None and nbytes:
            self.index.add(key, nbytes)  # evicts (deletes) files over the budget
        if self.record_events:
            with self._lock:
                self._l3_events.append(KVEvent("stored", "l3", [key]))

    def _l3_used(self, keys: list[bytes]) -> None:
        if self.index is not None:
            self.index.touch(keys)
        if self.record_events and keys:
            with self._lock:
                self._l3_events.append(KVEvent("hit", "l3", keys))

    def _l3_gone(self, keys: list[bytes]) -> None:
        if self.index is not None:
            self.index.remove(keys)
        if self.record_events and keys:
            with self._lock:
                self._l3_events.append(KVEvent("removed", "l3", keys))

    def _measure(self, name: str, value: float) -> None:
        old = self.costs[name]
        self.costs[name] = value if old is None else (1 - EMA) * old + EMA * value

    @property
    def page_file_bytes(self) -> int:
        return HEADER_BYTES + self.l1.bytes_per_page


def build_cache(
    kv: KVCache,
    pool: PagePool,
    model_identity: str,
    tiers: HiCacheConfig | None,
    record_events: bool = False,
    own_store_index: bool = True,
    on_loaded: Callable[[LoadPlan], None] = lambda plan: None,
) -> CacheIndex:
    """The prefix cache for a pool: L1 only, or tiered per `tiers`. Page keys (and L3 file
    names) are seeded with the model identity, dtype and page layout, so a page is only ever
    found by a worker that computes the same KV. own_store_index: this process enforces the
    L3 budget (colocated); in a cluster the cache service does."""
    _, layers, _, _, heads, dim = kv.data.shape
    ps = kv.page_size
    fmt = PageFormat(
        model_identity,
        str(kv.data.dtype).removeprefix("torch."),
        ps,
        layers,
        heads,
        dim,
        kv.bytes_per_page,
    )
    seed = hashlib.blake2b(repr(fmt).encode(), digest_size=16).digest()
    if tiers is None or not tiers.enabled:
        return RadixCache(ps, seed, record_events)
    store: PageStore | None = None
    index: StoreIndex | None = None
    if tiers.storage_backend == "file":
        assert tiers.storage_dir is not None
        store = FileStore(tiers.storage_dir, fmt)
        if own_store_index:
            index = StoreIndex(tiers.storage_dir, int(tiers.storage_size_gb * 1e9))
    elif tiers.storage_backend == "redis":  # Redis keeps its own budget (maxmemory, LRU)
        from strata.kv.redis_store import RedisStore

        assert tiers.storage_url is not None
        store = RedisStore(tiers.storage_url, fmt)
    host_pages = tiers.host_pages(pool.num_pages, kv.bytes_per_page)
    l2 = None
    if kv.data.shape[0] > pool.num_pages:  # the pool's tail past L1 is L2 (KVCache.rows)
        l2 = kv.rows(pool.num_pages, kv.data.shape[0])
    return TieredCache(
        kv, pool, host_pages, tiers.write_policy, seed, store, index, on_loaded, record_events, l2
    )
