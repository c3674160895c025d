"""Eviction from the radix tree (a mixin of RadixTree, strata/cache/tree.py): least recently
used unlocked leaves of each tier (lower retention priority first, while a priority holds),
a locked path handed back, everything flushed. The
invariant it keeps is in tree.py's docstring."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable

from strata.cache.node import Node
from strata.cache.results import Evicted, HostDrop


class Eviction:
    root: Node
    page_size: int
    cached_pages: int
    host_pages: int
    _nodes: dict[int, Node]
    _set_pages: Callable[[Node, list[int] | None], None]
    _set_host: Callable[[Node, list[int] | None], None]
    lock: Callable[[int], None]
    unlock: Callable[[int], None]

    def give_back(self, node_id: int) -> tuple[int, list[int], list[int]]:
        """The holder of a lock on node_id takes the deepest L1 pages of its path back from
        the tree: walking up from node_id, every node that nobody else locks and that has no
        other child in L1 leaves L1 (its pages now belong to the caller; it stays as an
        L2-only node if it has an L2 copy, else it leaves the tree with its L2-only subtree).
        The caller's lock moves to the first node kept. Returns (that node, the pages taken
        back, the L2 pages freed)."""
        self.unlock(node_id)
        node = self._nodes[node_id]
        taken: list[int] = []
        host: list[int] = []
        while (
            node is not self.root
            and node.lock == 0
            and node.pages is not None
            and all(c.pages is None for c in node.children.values())
        ):
            parent = node.parent
            assert parent is not None
            taken[:0] = node.pages
            self._set_pages(node, None)
            if node.host is None:
                host.extend(self._drop(node))
            node = parent
        self.lock(node.id)
        return node.id, taken, host

    def evict(
        self, num_pages: int, demote: Callable[[list[int]], list[int] | None] | None = None
    ) -> Evicted:
        """Release at least num_pages L1 pages, least recently used unlocked L1 leaves first
        (or until nothing is evictable). A node with an L2 copy stays in the tree as L2-only;
        one without asks `demote(pages)` for L2 pages holding a copy (None: no room), else it
        is dropped with its L2-only subtree. NOTE: demote may evict L2-only nodes (never an
        L1 node), so the walk stays valid."""
        now = time.monotonic()
        heap = [self._order(n, now) for n in self._nodes.values() if self._l1_evictable(n)]
        heapq.heapify(heap)
        freed: list[int] = []
        dropped: list[int] = []
        while heap and len(freed) < num_pages:
            *_, node_id = heapq.heappop(heap)
            node = self._nodes[node_id]
            assert self._l1_evictable(node) and node.pages is not None
            if node.host is None and demote is not None:
                host = demote(node.pages)
                if host is not None:
                    self._set_host(node, host)
            freed.extend(node.pages)
            self._set_pages(node, None)
            if node.host is None:
                dropped.extend(self._drop(node))
            parent = node.parent
            if parent is not None and self._l1_evictable(parent):
                heapq.heappush(heap, self._order(parent, now))
        return Evicted(freed, dropped)

    def evict_host(self, num_pages: int) -> list[HostDrop]:
        """Release at least num_pages L2 pages (or all that can go), least recently used
        first: L2 copies of unlocked L1 nodes, and unlocked L2-only leaves (which leave the
        tree); returns them with their page keys."""
        now = time.monotonic()
        heap = [self._order(n, now) for n in self._nodes.values() if self._l2_evictable(n)]
        heapq.heapify(heap)
        drops: list[HostDrop] = []
        released = 0
        while heap and released < num_pages:
            *_, node_id = heapq.heappop(heap)
            node = self._nodes.get(node_id)
            if node is None or not self._l2_evictable(node):  # pushed twice: an L1 parent
                continue
            assert node.host is not None
            left = node.pages is None
            drops.append(HostDrop(node.keys, node.host, left))
            released += len(node.host)
            self._set_host(node, None)
            if not left:
                continue
            self._remove(node)
            parent = node.parent
            if parent is not None and parent.pages is None and self._l2_evictable(parent):
                heapq.heappush(heap, self._order(parent, now))
        return drops

    def flush(self) -> Evicted:
        """Drop every unlocked page of both tiers; returns them."""
        pages, host = self.evict(self.cached_pages)
        for drop in self.evict_host(self.host_pages):
            host.extend(drop.host_pages)
        return Evicted(pages, host)

    @staticmethod
    def _order(node: Node, now: float) -> tuple[int, int, int]:
        """Eviction order: lower retention priority first (while it holds), then LRU."""
        priority = node.priority if node.priority_until > now else 0
        return priority, node.last_access, node.id

    def prioritize(self, node_id: int, priority: int, ttl: float) -> None:
        """Hold the path from node to the root at priority for ttl seconds; a higher
        priority that still holds on a node stays."""
        now = time.monotonic()
        node: Node | None = self._nodes[node_id]
        while node is not None and node is not self.root:
            held = node.priority if node.priority_until > now else 0
            if priority > held:
                node.priority, node.priority_until = priority, now + ttl
            elif priority == held:
                node.priority_until = max(node.priority_until, now + ttl)
            node = node.parent

    def _l1_evictable(self, node: Node) -> bool:
        return (
            node is not self.root
            and node.pages is not None
            and node.lock == 0
            and all(c.pages is None for c in node.children.values())
        )

    def _l2_evictable(self, node: Node) -> bool:
        return (
            node is not self.root
            and node.host is not None
            and node.lock == 0
            and (node.pages is not None or not node.children)
        )

    def _drop(self, node: Node) -> list[int]:
        """Remove an unlocked node that has left L1 with its subtree (all L2-only); returns
        the subtree's L2 pages."""
        host: list[int] = []
        for child in list(node.children.values()):
            host.extend(self._drop(child))
        if node.host is not None:
            host.extend(node.host)
            self._set_host(node, None)
        self._remove(node)
        return host

    def _remove(self, node: Node) -> None:
        assert node.pages is None and node.host is None and node.lock == 0
        parent = node.parent
        assert parent is not None
        del parent.children[node.key[: self.page_size]]
        del self._nodes[node.id]
