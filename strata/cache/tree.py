"""RadixTree: page-aligned prefix index from token ids to KV pages in two memory tiers, with
LRU eviction and KV events.

Pure Python: it knows token ids, page ids per tier (L1 device, L2 host), page keys, locks and
access times, nothing else. A node's pages live in L1, in L2, or in both (an L2 copy of an L1
node is its backup).

NOTE (invariant): the L1 nodes form a prefix-closed subtree: a node with L1 pages has a
parent with L1 pages (or the root). A match is therefore some L1 nodes, then some L2-only
nodes. L1 eviction takes L1 leaves (nodes whose children are all L2-only) and L2 eviction
takes L2-only leaves, so neither breaks it.
"""

from __future__ import annotations

from collections.abc import Sequence

from strata.cache.eviction import Eviction
from strata.cache.keys import page_keys
from strata.cache.node import Node
from strata.cache.results import Attached, KVEvent, MatchResult, TreeStats


class RadixTree(Eviction):
    def __init__(self, page_size: int, seed: bytes = b"", record_events: bool = False) -> None:
        assert page_size > 0
        self.page_size = page_size
        self.seed = seed  # the first page's parent key (the model's identity)
        self._ids = 0
        self._clock = 0
        self.root = Node(0, (), [], None)
        self.root.pages, self.root.host = [], []
        self.root.lock = 1  # the root is never evicted
        self._nodes: dict[int, Node] = {0: self.root}
        self.cached_pages = 0  # L1
        self.host_pages = 0  # L2
        self.prompt_tokens = self.cached_tokens = self.l2_tokens = self.l3_tokens = 0
        self.events: list[KVEvent] | None = [] if record_events else None

    # ---- lookups -------------------------------------------------------------------------

    def match_prefix(self, tokens: Sequence[int]) -> MatchResult:
        """Longest cached prefix of tokens, in whole pages: its L1 part, then its L2-only
        part; refreshes its access time."""
        ps, node = self.page_size, self.root
        pages: list[int] = []
        host: list[int] = []
        now = self._tick()
        i, l1_node = 0, 0
        while i + ps <= len(tokens):
            child = node.children.get(tuple(tokens[i : i + ps]))
            if child is None:
                break
            n = self._common_pages(child.key, tokens, i)
            if n < len(child.keys):
                child = self._split(child, n)
            child.last_access = now
            if child.pages is not None:
                assert not host, "an L1 node under an L2-only node"
                pages.extend(child.pages)
                l1_node = child.id
            else:
                assert child.host is not None
                host.extend(child.host)
            i += len(child.key)
            node = child
        return MatchResult(
            pages, len(pages) * ps, l1_node, host, len(host) * ps, node.id if host else 0
        )

    def keys_of(self, tokens: Sequence[int]) -> list[bytes]:
        """Page keys of every whole page of tokens (cached or not)."""
        return page_keys(self.seed, tokens, self.page_size)

    def record_lookup(
        self, prompt_tokens: int, cached_tokens: int, l2_tokens: int = 0, l3_tokens: int = 0
    ) -> None:
        """Count one prompt toward the hit rates (called by the user of the match)."""
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens
        self.l2_tokens += l2_tokens
        self.l3_tokens += l3_tokens

    def record_hit(self, node_id: int) -> None:
        node: Node | None = self._nodes[node_id]
        while node is not None:
            node.hits += 1
            node = node.parent

    def unbacked(self, node_id: int, min_hits: int = 0) -> list[int]:
        """Nodes on the path to node_id that are in L1 with no L2 copy (and were hit at least
        min_hits times), root first."""
        return [
            n.id
            for n in self._path(node_id)
            if n.pages is not None and n.host is None and n.hits >= min_hits
        ]

    def segments(self, node_id: int) -> list[int]:
        """Page counts of the L1 nodes on the path to node_id, root first: the radix segments
        of a prefix that matched up to node_id (sparse attention scores them as a whole)."""
        return [len(n.pages) for n in self._path(node_id) if n.pages is not None]

    def pages_of(self, node_id: int) -> tuple[list[int], list[bytes]]:
        """A node's L1 pages and page keys."""
        node = self._nodes[node_id]
        assert node.pages is not None
        return node.pages, node.keys

    # ---- updates -------------------------------------------------------------------------

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> int:
        """Cache L1 pages for tokens (len(tokens) == len(pages) * page_size).

        Returns how many leading tokens were already in L1: the caller's pages for those
        tokens are not taken by the tree (the caller frees them unless they are the tree's).
        The rest are taken, by L2-only nodes on the path (which are then in L1 again) and by
        a new node.
        """
        left = self.attach(tokens, 0, pages).pages
        assert list(pages[: len(left)]) == left, "L1 nodes form a prefix"
        return len(left) * self.page_size

    def attach(
        self,
        tokens: Sequence[int],
        start: int,
        pages: Sequence[int],
        host: Sequence[int] | None = None,
    ) -> Attached:
        """Give the tree L1 pages (and with `host`, their L2 copies) for tokens[start:], whose
        prefix tokens[:start] must be cached. Page by page: a node in L1 keeps its own pages;
        an L2-only node under an L1 node takes ours (and keeps its own L2 copy); past the
        end of the path a new node takes the rest. Returns what was not taken."""
        ps = self.page_size
        assert start % ps == 0 and len(tokens) - start == len(pages) * ps, "whole pages only"
        assert host is None or len(host) == len(pages)
        now = self._tick()
        node, i = self.root, 0
        left: list[int] = []
        host_left: list[int] = []
        while i < len(tokens):
            child = node.children.get(tuple(tokens[i : i + ps]))
            if child is None:
                if i < start:
                    raise ValueError("attach: the tokens before start are not cached")
                j = (i - start) // ps
                if node.pages is None and host is None:  # L1 stays prefix-closed
                    return Attached(left + list(pages[j:]), host_left)
                new = self._new_node(tuple(tokens[i:]), node)
                new.last_access = now
                if node.pages is None:  # under an L2-only node: L2 only
                    left.extend(pages[j:])
                else:
                    self._set_pages(new, list(pages[j:]))
                if host is not None:
                    self._set_host(new, list(host[j:]))
                return Attached(left, host_left)
            n = self._common_pages(child.key, tokens, i)
            if n < len(child.keys):
                child = self._split(child, n)
            if i < start < i + len(child.key):
                child = self._split(child, (start - i) // ps)
            child.last_access = now
            if i >= start:
                j, k = (i - start) // ps, len(child.keys)
                if child.pages is None and node.pages is not None:
                    self._set_pages(child, list(pages[j : j + k]))
                else:
                    left.extend(pages[j : j + k])
                if host is not None:
                    host_left.extend(host[j : j + k])
            i += len(child.key)
            node = child
        return Attached(left, host_left)

    def set_host(self, node_id: int, host: list[int]) -> None:
        """Record the L2 copy of an L1 node (a backup, or before it leaves L1)."""
        node = self._nodes[node_id]
        assert node.host is None and len(host) == len(node.keys)
        self._set_host(node, host)

    def lock(self, node_id: int) -> None:
        """Pin the path from node to the root against eviction (reference counted)."""
        node: Node | None = self._nodes[node_id]
        while node is not None:
            node.lock += 1
            node = node.parent

    def unlock(self, node_id: int) -> None:
        path: list[Node] = []
        node: Node | None = self._nodes[node_id]
        while node is not None:
            if node.lock <= 0:
                raise ValueError(f"unlock of node {node_id} without a lock")
            path.append(node)
            node = node.parent
        for n in path:
            n.lock -= 1

    def snapshot(self) -> dict[str, list[bytes]]:
        """Page keys per tier: what a mirror of this tree must hold."""
        out: dict[str, list[bytes]] = {"l1": [], "l2": []}
        for n in self._nodes.values():
            if n is not self.root:
                if n.pages is not None:
                    out["l1"].extend(n.keys)
                if n.host is not None:
                    out["l2"].extend(n.keys)
        return out

    def take_events(self) -> list[KVEvent]:
        """The events since the last call (none unless the tree records them)."""
        if not self.events:
            return []
        events, self.events = self.events, []
        return events

    # ---- statistics ----------------------------------------------------------------------

    def stats(self) -> TreeStats:
        branch_depths = [n.depth for n in self._nodes.values() if len(n.children) >= 2]
        locked = sum(len(n.keys) for n in self._nodes.values() if n.lock > 0)
        return TreeStats(
            total_nodes=len(self._nodes) - 1,
            cached_pages=self.cached_pages,
            locked_pages=locked,
            shared_prefix_count=len(branch_depths),
            avg_sharing_depth=sum(branch_depths) / len(branch_depths) if branch_depths else 0.0,
            hit_rate=self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            host_pages=self.host_pages,
            l2_tokens=self.l2_tokens,
            l3_tokens=self.l3_tokens,
        )

    # ---- internals -----------------------------------------------------------------------

    def _path(self, node_id: int) -> list[Node]:
        """The nodes from the root's child down to node_id."""
        path = []
        node: Node | None = self._nodes[node_id]
        while node is not None and node is not self.root:
            path.append(node)
            node = node.parent
        return path[::-1]

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _emit(self, kind: str, tier: str, keys: list[bytes]) -> None:
        if self.events is not None:
            self.events.append(KVEvent(kind, tier, keys))

    def _set_pages(self, node: Node, pages: list[int] | None) -> None:
        if node.pages is not None:
            self.cached_pages -= len(node.pages)
            self._emit("removed", "l1", node.keys)
        node.pages = pages
        if pages is not None:
            self.cached_pages += len(pages)
            self._emit("stored", "l1", node.keys)

    def _set_host(self, node: Node, host: list[int] | None) -> None:
        if node.host is not None:
            self.host_pages -= len(node.host)
            self._emit("removed", "l2", node.keys)
        node.host = host
        if host is not None:
            self.host_pages += len(host)
            self._emit("stored", "l2", node.keys)

    def _new_node(self, key: tuple[int, ...], parent: Node) -> Node:
        self._ids += 1
        prev = parent.keys[-1] if parent.keys else self.seed
        node = Node(self._ids, key, page_keys(prev, key, self.page_size), parent)
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

    def _split(self, node: Node, n_pages: int) -> Node:
        """Cut node after n_pages pages; returns the new upper node (which keeps the locks)."""
        assert 0 < n_pages < len(node.keys)
        parent = node.parent
        assert parent is not None
        cut = n_pages * self.page_size
        self._ids += 1
        upper = Node(self._ids, node.key[:cut], node.keys[:n_pages], parent)
        parent.children[upper.key[: self.page_size]] = upper
        self._nodes[upper.id] = upper
        upper.lock, upper.last_access, upper.hits = node.lock, node.last_access, node.hits
        if node.pages is not None:
            upper.pages, node.pages = node.pages[:n_pages], node.pages[n_pages:]
        if node.host is not None:
            upper.host, node.host = node.host[:n_pages], node.host[n_pages:]
        node.key, node.keys, node.parent = node.key[cut:], node.keys[n_pages:], upper
        upper.children[node.key[: self.page_size]] = node
        return upper
