"""KV tiers without a model: page bytes through L1 -> L2 -> L3 -> L1, a hypothesis state
machine over the tiered cache, and the L3 store's format, budget and restart."""

from __future__ import annotations

import os
import time
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from strata.cache.hierarchy import TieredCache
from strata.cache.results import KVEvent
from strata.kv.mover import LoadPlan, TierMover
from strata.kv.pool import KVCache, PagePool, alloc_evicting
from strata.kv.store import CorruptPage, FileStore, PageFormat, StoreIndex, key_path

PS = 2
SHAPE = dict(num_layers=2, page_size=PS, num_kv_heads=2, head_dim=4)


def pool(num_pages: int) -> tuple[KVCache, PagePool]:
    return KVCache(num_pages=num_pages, dtype=torch.float32, device="cpu", **SHAPE), PagePool(
        num_pages
    )


def fmt(kv: KVCache, model: str = "m") -> PageFormat:
    return PageFormat(model, "float32", PS, 2, 2, 4, kv.bytes_per_page)


def content(key: bytes, like: torch.Tensor) -> torch.Tensor:
    """What a page with this key holds (a stand-in for the KV the model would compute)."""
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))
    return torch.randn(like.shape, generator=g)


def wait_loads(cache: TieredCache, plans: list[LoadPlan]) -> None:
    for plan in plans:
        assert plan.done.wait(10)
        cache.finish_load(plan)


def make(l1_pages: int, l2_pages: int, store_dir: Path | None = None, policy="write_through"):
    kv, l1 = pool(l1_pages)
    store = index = None
    if store_dir is not None:
        store = FileStore(store_dir, fmt(kv))
        index = StoreIndex(store_dir, 1 << 30)
    cache = TieredCache(kv, l1, l2_pages, policy, b"seed", store, index)
    cache._l3_pays = lambda pages: True  # tiny pages: force L3 even where recomputing pays
    return kv, l1, cache


def compute(kv: KVCache, cache: TieredCache, tokens: list[int], pages: list[int], start: int):
    """Fill pages for tokens[start:] as a forward pass would (content by page key)."""
    keys = cache.tree.keys_of(tokens)
    for i, p in enumerate(pages):
        kv.data[p] = content(keys[start // PS + i], kv.data[p])


def test_page_bytes_survive_l1_l2_l3_and_back(tmp_path):
    kv, l1, cache = make(8, 8, tmp_path, policy="write_back")
    tokens = list(range(12))
    pages = l1.alloc(6)
    kv.data[pages] = torch.randn(6, *kv.data.shape[1:])
    original = kv.data[pages].clone()
    assert cache.insert(tokens, pages) == 0
    l1.free(cache.evict(6))  # write_back: demoted to L2 now
    assert cache.match(tokens).host_length == 12 and cache.tree.host_pages == 6
    host = cache.match(tokens).host_pages
    assert torch.equal(cache.l2.data[host], original)
    cache.host_pool.free(cache._evict_host(6))  # dropped from L2: written to L3
    cache.mover._writes.submit(lambda: None).result()  # the writer has caught up
    assert len(cache.index) == 6 and cache.match(tokens + [0]).host_length == 0
    kv.data.zero_()
    plans = cache.plan_loads(tokens + [99])
    assert [p.source for p in plans] == ["l3"]
    wait_loads(cache, plans)
    m = cache.match(tokens)
    assert m.length == 12
    assert torch.equal(kv.data[m.pages], original)
    assert l1.num_free + cache.tree.cached_pages == 8


def test_l2_is_priced_at_start_without_changing_a_page():
    kv, l1 = pool(8)
    kv.data.copy_(torch.randn(kv.data.shape))
    before = kv.data.clone()
    cache = TieredCache(kv, l1, 4, "write_through", b"seed")
    assert cache.costs["l2_page"] is not None and cache.costs["l2_page"] > 0
    assert cache.costs["l3_page"] is None and cache.costs["compute_token"] is None
    assert torch.equal(kv.data, before)
    assert not any(cache.tier_stats()["bytes_moved"].values())  # no traffic counted


def test_l2_hit_is_loaded_back_and_counted(tmp_path):
    kv, l1, cache = make(4, 8)
    a, b = list(range(8)), list(range(100, 108))
    for tokens in (a, b):  # b pushes a out of L1 (write_through: it has an L2 copy)
        pages = alloc_evicting(l1, 4, cache.evict)
        assert pages is not None
        compute(kv, cache, tokens, pages, 0)
        cache.insert(tokens, pages)
    m = cache.match(a + [1])
    assert (m.length, m.host_length) == (0, 8)
    plans = cache.plan_loads(a + [1])
    assert [p.source for p in plans] == ["l2"]
    wait_loads(cache, plans)
    m = cache.match(a + [1])
    assert m.length == 8
    keys = cache.tree.keys_of(a)
    for p, key in zip(m.pages, keys):
        assert torch.equal(kv.data[p], content(key, kv.data[p]))
    assert cache.tier_stats()["bytes_moved"]["l2_to_l1"] == 4 * kv.bytes_per_page


def test_store_rejects_truncated_corrupt_and_foreign_files(tmp_path):
    kv, _ = pool(2)
    store = FileStore(tmp_path, fmt(kv))
    page = np.arange(kv.bytes_per_page, dtype=np.uint8)
    out = np.zeros_like(page)
    keys = [bytes([i]) * 16 for i in range(4)]
    for key in keys:
        assert store.write(key, page) > 0
    assert store.write(keys[0], page) == 0  # exists: not rewritten
    assert store.read_into(keys[0], out) and np.array_equal(out, page)
    with open(store.path(keys[1]), "r+b") as f:  # truncated
        f.truncate(os.path.getsize(store.path(keys[1])) - 7)
    with open(store.path(keys[2]), "r+b") as f:  # one flipped byte in the payload
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    other = FileStore(tmp_path, fmt(kv, model="another"))
    for key, why in ((keys[1], "truncated"), (keys[2], "checksum")):
        with pytest.raises(CorruptPage, match=why):
            store.read_into(key, out)
        assert not store.path(key).exists()  # removed: the page is recomputed and rewritten
    with pytest.raises(CorruptPage, match="another model"):
        other.read_into(keys[3], out)
    assert store.path(keys[3]).exists()  # not ours to delete
    assert store.errors == 2 and other.errors == 1
    assert not store.read_into(b"\x09" * 16, out)  # missing
    assert store.count_present([keys[0], keys[1], keys[3]]) == 1


def test_store_index_enforces_budget_lru_and_rebuilds_on_restart(tmp_path):
    kv, _ = pool(2)
    store = FileStore(tmp_path, fmt(kv))
    page = np.zeros(kv.bytes_per_page, dtype=np.uint8)
    size = store.write(b"\x00" * 16, page)
    index = StoreIndex(tmp_path, budget_bytes=3 * size)
    assert len(index) == 1
    keys = [bytes([i]) * 16 for i in range(1, 5)]
    for i, key in enumerate(keys):
        index.add(key, store.write(key, page))
        if i == 1:
            index.touch([b"\x00" * 16])  # now keys[0] is the oldest
    assert index.total_bytes <= 3 * size and index.evicted == 2
    assert b"\x00" * 16 in index and keys[0] not in index and keys[1] not in index
    assert not key_path(tmp_path, keys[0]).exists()  # evicted files are deleted
    (key_path(tmp_path, keys[2]).parent / ".half-written.tmp").write_bytes(b"x")
    time.sleep(0.01)
    restarted = StoreIndex(tmp_path, budget_bytes=2 * size)  # restart with a smaller budget
    assert len(restarted) == 2 and restarted.total_bytes == 2 * size
    assert not (key_path(tmp_path, keys[2]).parent / ".half-written.tmp").exists()


class TieredCacheMachine(RuleBasedStateMachine):
    """Requests run against a small tiered cache with a store; at every step each tier's
    pages are owned exactly once and every cached page (and file) holds its prefix's KV."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = Path(tempfile.mkdtemp())
        self.start()
        self.running: list[tuple[list[int], list[int], int, int]] = []  # tokens, pages, node, n

    def start(self) -> None:
        self.kv, self.l1, self.cache = make(10, 8, self.dir, policy=self.policy)

    policy = "write_through"

    @rule(
        tokens=st.lists(st.integers(0, 2), min_size=1, max_size=9),
        keep=st.booleans(),
    )
    def submit(self, tokens, keep):
        plans = self.cache.plan_loads(tokens)
        wait_loads(self.cache, plans)
        m = self.cache.match(tokens)
        usable = min(m.length, (len(tokens) - 1) // PS * PS)
        shared = m.pages[: usable // PS]
        self.cache.lock(m.node)
        self.cache.record_hit(m.node)
        need = -(-len(tokens) // PS) - len(shared)
        own = alloc_evicting(self.l1, need, self.cache.evict)
        if own is None:
            self.cache.unlock(m.node)
            return
        full = len(tokens) // PS
        compute(self.kv, self.cache, tokens[: full * PS], own[: full - len(shared)], usable)
        req = (tokens, shared + own, m.node, len(shared))
        if keep:
            self.running.append(req)
        else:
            self._finish(req)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 10))
    def finish(self, i):
        self._finish(self.running.pop(i % len(self.running)))

    def _finish(self, req) -> None:
        tokens, pages, node, shared = req
        full = len(tokens) // PS
        existing = self.cache.insert(tokens[: full * PS], pages[:full]) // PS
        self.l1.free(pages[shared:existing] + pages[full:])
        self.cache.unlock(node)

    @rule(n=st.integers(1, 6))
    def evict_l1(self, n):
        self.l1.free(self.cache.evict(n))

    @rule(n=st.integers(1, 6))
    def evict_l2(self, n):
        self.cache.host_pool.free(self.cache._evict_host(n))

    @precondition(lambda self: not self.running)
    @rule()
    def flush(self):
        self.l1.free(self.cache.flush())

    @precondition(lambda self: not self.running)
    @rule()
    def restart(self):
        self.cache.close()
        self.start()

    @invariant()
    def pages_owned_once_and_correct(self):
        self.cache.mover._writes.submit(lambda: None).result()
        tree = self.cache.tree
        l1, l2 = [], []
        for node in tree._nodes.values():
            if node is tree.root:
                continue
            for tier, got in ((l1, node.pages), (l2, node.host)):
                if got is not None:
                    tier.extend(got)
            for i, key in enumerate(node.keys):
                if node.pages is not None:
                    assert torch.equal(self.kv.data[node.pages[i]], content(key, self.kv.data[0]))
                if node.host is not None:
                    page = self.cache.l2.data[node.host[i]]
                    assert torch.equal(page, content(key, page))
        own = [p for _, pages, _, shared in self.running for p in pages[shared:]]
        free1 = list(self.l1._free)
        assert sorted(l1 + own + free1) == list(range(10)), "an L1 page leaked or is owned twice"
        free2 = list(self.cache.host_pool._free)
        assert sorted(l2 + free2) == list(range(8)), "an L2 page leaked or is owned twice"
        index = self.cache.index
        assert index is not None
        for key in list(index._files):
            out = np.zeros(self.kv.bytes_per_page, dtype=np.uint8)
            assert self.cache.store is not None and self.cache.store.read_into(key, out)
            want = content(key, self.kv.data[0]).numpy().view(np.uint8).reshape(-1)
            assert np.array_equal(out, want)

    def teardown(self) -> None:
        self.cache.close()


class WriteBackMachine(TieredCacheMachine):
    policy = "write_back"


class SelectiveMachine(TieredCacheMachine):
    policy = "write_through_selective"


for machine in (TieredCacheMachine, WriteBackMachine, SelectiveMachine):
    machine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)

test_tiered_cache_state_machine = TieredCacheMachine.TestCase
test_write_back_state_machine = WriteBackMachine.TestCase
test_selective_state_machine = SelectiveMachine.TestCase


class SlowStore(FileStore):
    """A real store on a slow disk: each read takes a while."""

    def read_into(self, key: bytes, out: np.ndarray) -> bool:
        time.sleep(0.05)
        return super().read_into(key, out)


def test_l3_evicts_files_without_a_priority_first_until_the_ttl_runs_out(tmp_path, monkeypatch):
    """The file store's budget evicts the least recently used file that holds no retention
    priority; a held one goes only once its TTL has run out, or when every file is held (the
    lowest priority first). TieredCache.prioritize holds a prefix's page files there too."""
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    idx = StoreIndex(tmp_path / "idx", 300)
    a, b, c, d, e, f = (bytes([i]) * 16 for i in range(6))
    for key in (a, b, c):
        idx.add(key, 100)
    idx.hold([a], 5, 60)
    idx.hold([a], 1, 600)  # a lower priority does not replace a higher one that holds
    assert idx.add(d, 100) == [b]  # a is the oldest, but held
    now[0] += 61
    assert idx.add(e, 100) == [a]  # its priority ran out: plain LRU again
    idx.hold([c], 2, 60)
    idx.hold([d], 9, 60)
    idx.hold([e], 3, 60)
    assert idx.add(f, 100) == [f]  # below every held file, the newcomer is the one to go
    g = bytes([6]) * 16
    idx.hold([g], 4, 60)  # held before its file is written
    assert idx.add(g, 100) == [c]  # all held: the lowest priority goes
    kv, l1, cache = make(8, 8, tmp_path / "store")
    assert cache.index is not None
    tokens = list(range(12))
    cache.insert(tokens, l1.alloc(6))
    cache.prioritize(tokens + [7], priority=4, ttl=30)
    assert all(cache.index._level(k, now[0]) == 4 for k in cache.tree.keys_of(tokens))
    # a cluster worker's pages are held by the cache service's index: a "held" event carries
    # the hold there, over the wire, before or after the pages' "stored" events
    from services.convert import batch_from_proto, batch_to_proto
    from strata.cache.mirror import Batch, ClusterIndex

    kv2, l1_2 = pool(8)
    worker = TieredCache(kv2, l1_2, 8, "write_back", b"seed", cache.store, None, record_events=True)
    worker.insert(tokens, l1_2.alloc(6))
    worker.take_events()
    worker.prioritize(tokens, priority=7, ttl=30)
    events = [ev for ev in worker.take_events() if ev.tier == "l3"]
    assert events == [KVEvent("held", "l3", worker.tree.keys_of(tokens), 7, 30)]
    service = ClusterIndex(StoreIndex(tmp_path / "service", 800))
    for snapshot, batch_events in ((True, []), (False, events)):  # first_seq 0 both times
        batch = Batch("w", b"seed", PS, 0, snapshot, batch_events, {}, 100)
        assert service.apply(batch_from_proto(batch_to_proto(batch)))
    assert service.store is not None
    held = worker.tree.keys_of(tokens)
    stored = [KVEvent("stored", "l3", [k]) for k in [*held, a, b]]
    assert service.apply(Batch("w", b"seed", PS, 1, False, stored, {}, 100))
    # 8 pages of 100 bytes fill its 800: the least recently used plain page goes, never a held one
    assert [service.store.add(k, 100) for k in (d, e, f)] == [[a], [b], [d]]


def test_no_read_lands_after_a_load_stops_at_a_missing_file(tmp_path):
    kv, _ = pool(8)
    l2 = KVCache(num_pages=8, dtype=torch.float32, device="cpu", **SHAPE)
    store = SlowStore(tmp_path, fmt(kv))
    keys = [bytes([i + 1]) * 16 for i in range(8)]
    page = np.full(kv.bytes_per_page, 7, dtype=np.uint8)
    for key in keys[1:]:  # the first file is missing: the load lands 0 pages
        store.write(key, page)
    ended: list[LoadPlan] = []
    mover = TierMover(kv, l2, store, ended.append, lambda key, n: None)
    try:
        plan = LoadPlan("l3", [], 0, list(range(8)), [], keys, lock_node=0)
        mover.submit(plan)
        deadline = time.monotonic() + 10
        while not ended and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ended == [plan] and plan.loaded == 0
        before = kv.data.clone()  # reads that ran while the load ran may have landed
        time.sleep(0.3)  # reads still queued or running would land now
        assert torch.equal(kv.data, before), "a read wrote into a page after the load ended"
    finally:
        mover.shutdown()


def redis_store(url: str, kv: KVCache, model: str = "m"):
    from strata.kv.redis_store import RedisStore

    return RedisStore(url, fmt(kv, model))


def test_page_bytes_survive_l1_l2_l3_in_redis_and_back(redis_url):
    """The same round trip with L3 in a real Redis: written on eviction from L2 (pipelined),
    found by another store of the same model, and loaded back byte for byte."""
    kv, l1 = pool(8)
    cache = TieredCache(kv, l1, 8, "write_back", b"seed", redis_store(redis_url, kv), None)
    cache._l3_pays = lambda pages: True
    tokens = list(range(12))
    pages = l1.alloc(6)
    kv.data[pages] = torch.randn(6, *kv.data.shape[1:])
    original = kv.data[pages].clone()
    cache.insert(tokens, pages)
    l1.free(cache.evict(6))
    cache.host_pool.free(cache._evict_host(6))  # dropped from L2: written to L3
    cache.mover._writes.submit(lambda: None).result()
    keys = cache.tree.keys_of(tokens)
    assert redis_store(redis_url, kv).count_present(keys) == 6
    kv.data.zero_()
    plans = cache.plan_loads(tokens + [99])
    assert [p.source for p in plans] == ["l3"]
    wait_loads(cache, plans)
    m = cache.match(tokens)
    assert m.length == 12 and torch.equal(kv.data[m.pages], original)
    assert cache.tier_stats()["bytes_moved"]["l3_to_l1"] == 6 * kv.bytes_per_page


def test_redis_store_rejects_truncated_corrupt_and_foreign_values(redis_url, redis_server):
    from strata.kv.redis_store import name

    kv, _ = pool(2)
    store, other = redis_store(redis_url, kv), redis_store(redis_url, kv, model="another")
    page = np.arange(kv.bytes_per_page, dtype=np.uint8)
    keys = [bytes([i]) * 16 for i in range(5)]
    written = store.write_many(keys, [page] * 5)
    assert all(w and w > kv.bytes_per_page for w in written)
    assert store.write_many(keys[:1], [page]) == [0]  # there already: not rewritten
    outs = [np.zeros_like(page) for _ in keys]
    assert store.read_many(keys, outs) == 5 and all(np.array_equal(o, page) for o in outs)
    raw = redis_server.client()
    raw.setrange(name(keys[1]), raw.strlen(name(keys[1])) - 1, b"\xff")  # a flipped byte
    raw.set(name(keys[2]), raw.get(name(keys[2]))[:-7])  # truncated
    for key, at in ((keys[1], 1), (keys[2], 0)):
        assert store.read_many([keys[0], key, keys[3]], outs[:3]) == at + (at == 0)
        assert raw.exists(name(key)) == 0  # deleted: the page is recomputed and rewritten
    assert store.read_many(keys[3:], outs[:2]) == 2
    assert other.read_many(keys[3:4], outs[:1]) == 0  # another model's: not loaded...
    assert raw.exists(name(keys[3])) == 1  # ...and not ours to delete
    assert (store.errors, other.errors) == (2, 1)
    assert store.count_present(keys) == 1 and store.count_present(keys[3:]) == 2
    raw.close()


def test_redis_evicts_by_its_own_budget_and_an_evicted_page_is_a_miss(redis_url, redis_server):
    kv, _ = pool(2)
    store = redis_store(redis_url, kv)
    raw = redis_server.client()
    raw.config_set("maxmemory", raw.info("memory")["used_memory"] + (1 << 20))
    try:
        keys = [i.to_bytes(16, "little") for i in range(4000)]  # ~3 MB of pages
        page = np.ones(kv.bytes_per_page, dtype=np.uint8)
        for start in range(0, len(keys), 50):
            assert all(store.write_many(keys[start : start + 50], [page] * 50))
        assert raw.info("stats")["evicted_keys"] > 0
        present = store.count_present(keys)
        assert present < len(keys)
        outs = [np.zeros_like(page) for _ in keys]
        assert store.read_many(keys, outs) == present  # up to the first evicted page
    finally:
        raw.config_set("maxmemory", redis_server.maxmemory)
        raw.close()


def test_redis_keeps_held_pages_from_its_own_eviction_until_the_hold_ends(redis_url, redis_server):
    """Under volatile-lru, Redis evicts only pages that carry an expiry: a held page (held
    before or after it is written) has none until its hold ends; when only held pages are
    left, a plain page is refused (not an outage) and a page held higher takes the room of
    the lowest held ones; an ended hold gives the expiry back."""
    from strata.kv.redis_store import HELD, LEVEL, RedisIndex, name

    kv, _ = pool(2)
    store = redis_store(redis_url, kv)
    raw = redis_server.client()
    page = np.ones(kv.bytes_per_page, dtype=np.uint8)
    held = [bytes([1, i]) * 8 for i in range(20)]
    assert all(store.write_many(held[:10], [page] * 10))
    store.hold(held, priority=5, ttl=60)  # ten written, ten still to be written
    assert all(store.write_many(held[10:], [page] * 10))
    assert all(raw.ttl(name(k)) == -1 for k in held)  # no expiry: never evicted
    assert len(RedisIndex(redis_url)) == 20  # pages only, not the sets of holds
    store.hold(held[:1], priority=1, ttl=600)  # a lower priority does not replace a higher one
    assert raw.zscore(LEVEL, name(held[0])) == 5
    assert raw.zscore(HELD, name(held[0])) < time.time() + 100  # nor extends it
    plain = [bytes([3]) + i.to_bytes(15, "little") for i in range(4000)]  # ~3 MB of pages
    assert store.write_many(plain[:1], [page])[0] and raw.ttl(name(plain[0])) > 86400
    raw.config_set("maxmemory", raw.info("memory")["used_memory"] + (1 << 20))
    try:
        for start in range(0, len(plain), 50):
            assert None not in store.write_many(plain[start : start + 50], [page] * 50)
        assert raw.info("stats")["evicted_keys"] > 0
        assert store.count_present(held) == 20  # plain pages made room; held ones stayed
        # only held pages left: new plain ones are refused (which is not an outage), and a
        # page held higher takes the room of the lowest held ones
        raw.flushdb()
        more = [bytes([2, i % 256, i // 256]) + bytes(13) for i in range(2000)]
        store.hold(more, priority=1, ttl=60)
        raw.config_set("maxmemory", raw.info("memory")["used_memory"] + (256 << 10))
        written: list[int | None] = []
        for start in range(0, len(more), 50):
            written += store.write_many(more[start : start + 50], [page] * 50)
        assert None in written and store.refused == written.count(None)
        assert store.link.failures == 0
        kept = sum(raw.exists(name(k)) for k in more)
        assert kept > 0 and store.write_many(plain[:8], [page] * 8) == [None] * 8
        top = [bytes([4, i]) + bytes(14) for i in range(40)]
        store.hold(top, priority=5, ttl=60)
        assert None not in store.write_many(top, [page] * 40)
        assert all(raw.ttl(name(k)) == -1 for k in top)
        assert sum(raw.exists(name(k)) for k in more) < kept
    finally:
        raw.config_set("maxmemory", redis_server.maxmemory)
    # a hold that ends gives its pages their expiry back at the next write
    short = [bytes([5, i]) + bytes(14) for i in range(4)]
    store.hold(short, priority=3, ttl=0.5)
    assert all(store.write_many(short, [page] * 4))
    assert all(raw.ttl(name(k)) == -1 for k in short)
    time.sleep(0.6)
    store.write_many(plain[8:9], [page])
    assert all(raw.pttl(name(k)) > 0 and raw.zscore(HELD, name(k)) is None for k in short)
    raw.close()


def test_a_redis_outage_is_a_miss_and_l3_comes_back(redis_url, redis_server, monkeypatch):
    from strata.kv import redis_store as rs

    monkeypatch.setattr(rs, "DOWN_SECONDS", 0.2)
    kv, _ = pool(2)
    store = redis_store(redis_url, kv)
    page = np.ones(kv.bytes_per_page, dtype=np.uint8)
    key = b"\x01" * 16
    assert store.write_many([key], [page])[0]
    redis_server.stop()
    out = np.zeros_like(page)
    start = time.monotonic()
    assert store.count_present([key]) == 0 and store.read_many([key], [out]) == 0
    assert store.write_many([key], [page]) == [None]
    assert time.monotonic() - start < 2  # refused at once, then quiet: no request waits
    assert store.link.failures == 1  # the calls after the first did not even try
    redis_server.start()  # empty again (no persistence)
    time.sleep(0.25)
    assert store.write_many([key], [page])[0] and store.read_many([key], [out]) == 1
