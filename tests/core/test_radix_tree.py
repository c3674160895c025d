"""RadixTree against a naive reference (one entry per cached page-aligned prefix)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from strata.cache.tree import RadixTree

PS = 2


class Naive:
    def __init__(self) -> None:
        self.page: dict[tuple[int, ...], int] = {}  # prefix (whole pages) -> its last page id
        self.time: dict[tuple[int, ...], int] = {}
        self.locks: dict[tuple[int, ...], int] = {}
        self.clock = 0

    def prefixes(self, tokens):
        return [tuple(tokens[: j * PS]) for j in range(1, len(tokens) // PS + 1)]

    def match(self, tokens):
        self.clock += 1
        found = list(itertools.takewhile(lambda p: p in self.page, self.prefixes(tokens)))
        for p in found:
            self.time[p] = self.clock
        return [self.page[p] for p in found], len(found) * PS

    def insert(self, tokens, pages):
        self.clock += 1
        existing = 0
        for p, page in zip(self.prefixes(tokens), pages):
            if p in self.page:
                existing += PS
            else:
                self.page[p] = page
                self.locks[p] = 0
            self.time[p] = self.clock
        return existing

    def is_leaf(self, p):
        return not any(q[: len(p)] == p and len(q) > len(p) for q in self.page)


token_lists = st.lists(st.integers(0, 2), min_size=0, max_size=10)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), token_lists),
        st.tuples(st.just("match_lock"), token_lists),
        st.tuples(st.just("unlock"), st.integers(0, 100)),
        st.tuples(st.just("evict"), st.integers(0, 6)),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(ops=ops)
def test_radix_tree_matches_naive_reference(ops):
    tree, naive = RadixTree(PS), Naive()
    next_page = itertools.count()
    owned: set[int] = set()  # pages the tree holds
    held: list[tuple[int, list]] = []  # (handle, locked prefixes)
    for op, arg in ops:
        if op == "insert":
            tokens = arg[: len(arg) // PS * PS]
            pages = [next(next_page) for _ in range(len(tokens) // PS)]
            existing = tree.insert(tokens, pages)
            assert existing == naive.insert(tokens, pages)
            owned |= set(pages[existing // PS :])
        elif op == "match_lock":
            pages, length, node, *_ = tree.match_prefix(arg)
            assert (pages, length) == naive.match(arg)
            tree.lock(node)
            locked = naive.prefixes(arg[:length])
            for p in locked:
                naive.locks[p] += 1
            held.append((node, locked))
        elif op == "unlock" and held:
            node, locked = held.pop(arg % len(held))
            tree.unlock(node)
            for p in locked:
                naive.locks[p] -= 1
        elif op == "evict":
            leaves = [p for p in naive.page if naive.locks[p] == 0 and naive.is_leaf(p)]
            freed = tree.evict(arg).pages
            assert len(set(freed)) == len(freed)
            assert set(freed) <= owned
            by_page = {v: k for k, v in naive.page.items()}
            gone = [by_page[f] for f in freed]
            assert all(naive.locks[p] == 0 for p in gone), "a locked page was evicted"
            if arg and leaves:
                assert freed, "evict released nothing although a leaf was evictable"
            newest_evicted = max((naive.time[p] for p in gone), default=0)
            for p in gone:
                del naive.page[p], naive.time[p], naive.locks[p]
            owned -= set(freed)
            survivors = [p for p in naive.page if naive.locks[p] == 0 and naive.is_leaf(p)]
            # LRU: nothing evicted was used more recently than an evictable survivor
            assert all(naive.time[p] >= newest_evicted for p in survivors)
        assert tree.cached_pages == len(naive.page) == len(owned)
        assert set(naive.page.values()) == owned
    for node, _ in held:
        tree.unlock(node)
    assert sorted(tree.flush().pages) == sorted(owned)
    assert tree.cached_pages == 0


def test_lru_evicts_the_least_recently_used_conversation_first():
    tree = RadixTree(PS)
    tree.insert([1, 1, 1, 1], [10, 11])
    tree.insert([2, 2, 2, 2], [20, 21])
    tree.insert([3, 3], [30])
    tree.match_prefix([1, 1, 1, 1])  # now 2 is the oldest, then 3, then 1
    assert tree.evict(1).pages == [20, 21]
    assert tree.evict(1).pages == [30]
    assert tree.evict(5).pages == [10, 11]


def test_locked_prefix_survives_eviction_and_shared_branch_stats():
    tree = RadixTree(PS)
    tree.insert([7, 7, 1, 1], [0, 1])
    tree.insert([7, 7, 2, 2], [0, 2])  # shares the first page; page 0 stays the tree's
    match = tree.match_prefix([7, 7, 1, 1, 5])
    assert match.pages == [0, 1] and match.length == 4
    tree.lock(match.node)
    assert sorted(tree.evict(10).pages) == [2]
    assert tree.match_prefix([7, 7, 1, 1]).pages == [0, 1]
    tree.unlock(match.node)
    stats = tree.stats()
    assert stats.total_nodes == 2 and stats.cached_pages == 2
    tree.insert([7, 7, 3, 3], [0, 3])
    stats = tree.stats()
    assert stats.shared_prefix_count == 1 and stats.avg_sharing_depth == 2.0
    tree.record_lookup(10, 4)
    assert tree.stats().hit_rate == 0.4


def test_give_back_takes_only_the_pages_nobody_else_holds():
    """A running request takes back the deepest pages of its path (fetch on select): not
    those another request locks, not a node with another child in L1; a node with an L2
    copy stays as an L2-only node, one without leaves the tree."""
    tree = RadixTree(PS)
    tree.insert([1, 1, 2, 2, 3, 3, 4, 4], [0, 1, 2, 3])
    tree.insert([1, 1, 5, 5], [0, 9])  # another branch under the first page, in L1
    mine = tree.match_prefix([1, 1, 2, 2, 3, 3, 4, 4]).node
    tree.lock(mine)
    other = tree.match_prefix([1, 1, 2, 2]).node  # a second request holds the first 2 pages
    tree.lock(other)
    deep = tree.match_prefix([1, 1, 2, 2, 3, 3]).node  # split: [3, 3] and [4, 4] apart
    tree.set_host(deep, [40])
    node, taken, host = tree.give_back(mine)
    assert taken == [2, 3] and host == []
    assert node == other  # my lock now sits where the other request's does
    assert tree.cached_pages == 3  # 0, 1 and the other branch's 9
    m = tree.match_prefix([1, 1, 2, 2, 3, 3, 4, 4])
    assert m.pages == [0, 1] and m.host_pages == [40]  # [3, 3] kept as L2-only, [4, 4] gone
    tree.unlock(other)
    node, taken, _ = tree.give_back(node)  # [1, 1] has another child in L1: it stays
    assert taken == [1] and node == tree.match_prefix([1, 1]).node
    tree.unlock(node)
    assert sorted(tree.flush().pages) == [0, 9]


def test_retention_priority_outlasts_lru_in_l1_and_l2_while_it_holds(monkeypatch):
    """The least recently used prefix goes first unless it holds a higher retention
    priority; once its TTL runs out it is plain LRU again. The same order rules L2."""
    import time

    from strata.cache.hierarchy import TieredCache
    from tests.core.test_kv_tiers import pool

    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    kv, l1 = pool(8)
    cache = TieredCache(kv, l1, 8, "write_through", b"seed", None, None)
    kept, other = list(range(8)), list(range(100, 108))  # 4 pages each (page size 2)
    cache.insert(kept, l1.alloc(4))
    cache.insert(other, l1.alloc(4))  # the more recently used
    cache.prioritize(kept, priority=5, ttl=60)
    cache.prioritize(kept, priority=1, ttl=600)  # a lower one does not override it
    l1.free(cache.evict(4))
    assert cache.match(kept).length == 8 and cache.match(other).length == 0
    cache.host_pool.free(cache._evict_host(4))  # L2: the copies of the prioritized ones stay
    assert cache.match(kept + [0]).length == 8 and cache.match(other + [0]).host_length == 0
    cache.insert(other, l1.alloc(4))
    now[0] += 61  # its priority ran out: LRU again, and `other` is the newer
    l1.free(cache.evict(4))
    assert cache.match(kept).length == 0 and cache.match(other).length == 8
