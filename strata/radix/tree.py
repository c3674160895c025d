"""RadixTree: page-aligned prefix index from token ids to KV page ids, with LRU eviction.

Pure Python: it knows token ids, page ids, locks and access times, nothing else. The same
class runs in-process (colocated mode) and inside the cache service (split mode).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class MatchResult(NamedTuple):
    pages: list[int]  # one page id per page_size matched tokens
    length: int  # matched tokens (a multiple of page_size)
    node: int  # handle of the deepest matched node (0 = root), for lock/unlock


@dataclass(frozen=True)
class TreeStats:
    total_nodes: int
    cached_pages: int
    locked_pages: int
    shared_prefix_count: int  # nodes where two or more cached sequences diverge
    avg_sharing_depth: float  # mean depth in tokens of those branch points
    hit_rate: float  # cached prompt tokens / prompt tokens, over all recorded lookups
    prompt_tokens: int
    cached_tokens: int


class _Node:
    __slots__ = ("id", "key", "pages", "parent", "children", "lock", "last_access", "depth")

    def __init__(self, node_id: int, key: tuple[int, ...], pages: list[int], parent: _Node | None):
        self.id = node_id
        self.key = key  # the tokens on the edge into this node (len = len(pages) * page_size)
        self.pages = pages
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}  # keyed by the child's first page
        self.lock = 0  # number of holders; NOTE: a locked node is never evicted
        self.last_access = 0
        self.depth: int = (parent.depth + len(key)) if parent else 0  # tokens from the root


class RadixTree:
    def __init__(self, page_size: int) -> None:
        assert page_size > 0
        self.page_size = page_size
        self._ids = 0
        self._clock = 0
        self.root = _Node(0, (), [], None)
        self.root.lock = 1  # the root is never evicted
        self._nodes: dict[int, _Node] = {0: self.root}
        self.cached_pages = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0

    # ---- lookups -------------------------------------------------------------------------

    def match_prefix(self, tokens: Sequence[int]) -> MatchResult:
        """Longest cached prefix of tokens, in whole pages; refreshes its access time."""
        ps, node, pages = self.page_size, self.root, []
        now = self._tick()
        i = 0
        while i + ps <= len(tokens):
            child = node.children.get(tuple(tokens[i : i + ps]))
            if child is None:
                break
            n = self._common_pages(child.key, tokens, i)
            if n < len(child.pages):
                child = self._split(child, n)
            child.last_access = now
            pages.extend(child.pages)
            i += len(child.key)
            node = child
        return MatchResult(pages, i, node.id)

    def record_lookup(self, prompt_tokens: int, cached_tokens: int) -> None:
        """Count one prompt toward hit_rate (called by the user of the match)."""
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens

    # ---- updates -------------------------------------------------------------------------

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> int:
        """Cache pages for tokens (len(tokens) == len(pages) * page_size).

        Returns how many leading tokens were already cached: the caller's pages for those
        tokens are not taken by the tree (the caller frees them unless they are the tree's).
        """
        ps = self.page_size
        assert len(tokens) == len(pages) * ps, "insert whole pages only"
        now = self._tick()
        node, i = self.root, 0
        while i < len(tokens):
            child = node.children.get(tuple(tokens[i : i + ps]))
            if child is None:
                new = self._new_node(tuple(tokens[i:]), list(pages[i // ps :]), node)
                new.last_access = now
                self.cached_pages += len(new.pages)
                return i
            n = self._common_pages(child.key, tokens, i)
            if n < len(child.pages):
                child = self._split(child, n)
            child.last_access = now
            i += len(child.key)
            node = child
        return i

    def lock(self, node_id: int) -> None:
        """Pin the path from node to the root against eviction (reference counted)."""
        node: _Node | None = self._nodes[node_id]
        while node is not None:
            node.lock += 1
            node = node.parent

    def unlock(self, node_id: int) -> None:
        path: list[_Node] = []
        node: _Node | None = self._nodes[node_id]
        while node is not None:
            if node.lock <= 0:
                raise ValueError(f"unlock of node {node_id} without a lock")
            path.append(node)
            node = node.parent
        for n in path:
            n.lock -= 1

    def evict(self, num_pages: int) -> list[int]:
        """Drop least-recently-used unlocked leaves until num_pages pages are released (or
        nothing evictable is left); returns the released page ids."""
        heap = [(n.last_access, n.id) for n in self._nodes.values() if self._evictable(n)]
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < num_pages:
            _, node_id = heapq.heappop(heap)
            node = self._nodes[node_id]
            freed.extend(node.pages)
            self._remove(node)
            parent = node.parent
            if parent is not None and self._evictable(parent):
                heapq.heappush(heap, (parent.last_access, parent.id))
        return freed

    def flush(self) -> list[int]:
        """Drop every unlocked page; returns them."""
        return self.evict(self.cached_pages)

    # ---- statistics ----------------------------------------------------------------------

    def stats(self) -> TreeStats:
        branch_depths = [n.depth for n in self._nodes.values() if len(n.children) >= 2]
        locked = sum(len(n.pages) for n in self._nodes.values() if n.lock > 0)
        return TreeStats(
            total_nodes=len(self._nodes) - 1,
            cached_pages=self.cached_pages,
            locked_pages=locked,
            shared_prefix_count=len(branch_depths),
            avg_sharing_depth=sum(branch_depths) / len(branch_depths) if branch_depths else 0.0,
            hit_rate=self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
        )

    @property
    def evictable_pages(self) -> int:
        return sum(len(n.pages) for n in self._nodes.values() if n.lock == 0)

    # ---- internals -----------------------------------------------------------------------

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _new_node(self, key: tuple[int, ...], pages: list[int], parent: _Node) -> _Node:
        self._ids += 1
        node = _Node(self._ids, key, pages, parent)
        parent.children[key[: self.page_size]] = node
        self._nodes[node.id] = node
        return node

    def _common_pages(self, key: tuple[int, ...], tokens: Sequence[int], start: int) -> int:
        """Whole pages of key that equal tokens[start:]."""
        ps, n = self.page_size, 0
        while (n + 1) * ps <= len(key) and start + (n + 1) * ps <= len(tokens):
            if tuple(tokens[start + n * ps : start + (n + 1) * ps]) != key[n * ps : (n + 1) * ps]:
                break
            n += 1
        return n

    def _split(self, node: _Node, n_pages: int) -> _Node:
        """Cut node after n_pages pages; returns the new upper node (which keeps the locks)."""
        assert 0 < n_pages < len(node.pages)
        parent = node.parent
        assert parent is not None
        cut = n_pages * self.page_size
        upper = self._new_node(node.key[:cut], node.pages[:n_pages], parent)
        upper.lock, upper.last_access = node.lock, node.last_access
        node.key, node.pages, node.parent = node.key[cut:], node.pages[n_pages:], upper
        upper.children[node.key[: self.page_size]] = node
        return upper

    def _evictable(self, node: _Node) -> bool:
        return node is not self.root and node.lock == 0 and not node.children

    def _remove(self, node: _Node) -> None:
        parent = node.parent
        assert parent is not None
        del parent.children[node.key[: self.page_size]]
        del self._nodes[node.id]
        self.cached_pages -= len(node.pages)
