"""CacheIndex: the seam between the scheduler and the prefix cache of one worker's KV pages.

Two homes: `RadixCache` (L1 only, here) and `TieredCache` (L1 + L2 host + L3 files,
strata/cache/hierarchy.py). Page ids in and out of this interface are L1 page ids; the tiered
cache moves the other tiers itself. The tree lives in the worker's process and is
authoritative; a cluster index (the cache service) mirrors it from `take_events`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from strata.cache.results import KVEvent, MatchResult, TreeStats
from strata.cache.tree import RadixTree

if TYPE_CHECKING:
    from strata.kv.mover import LoadPlan


class CacheIndex(ABC):
    """Prefix index of one worker's KV pages."""

    tree: RadixTree

    @abstractmethod
    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> int:
        """Cache whole pages; returns how many leading tokens were cached already."""

    @abstractmethod
    def evict(self, num_pages: int) -> list[int]:
        """Release at least num_pages LRU unlocked L1 pages if possible; returns them."""

    @abstractmethod
    def flush(self) -> list[int]:
        """Drop every unlocked page; returns the L1 pages."""

    def match(self, tokens: Sequence[int]) -> MatchResult:
        """Longest cached page-aligned prefix of tokens (refreshes its LRU time)."""
        return self.tree.match_prefix(tokens)

    def lock(self, node: int) -> None:
        """Pin a matched prefix against eviction until unlock(node)."""
        self.tree.lock(node)

    def unlock(self, node: int) -> None:
        self.tree.unlock(node)

    def prioritize(self, tokens: Sequence[int], priority: int, ttl: float) -> None:
        """Hold the cached prefix of tokens (L1 and L2) at a retention priority for ttl s."""
        m = self.tree.match_prefix(tokens)
        node = m.host_node or m.node
        if node:
            self.tree.prioritize(node, priority, ttl)

    def segments(self, node: int) -> list[int]:
        """Page counts of the radix nodes of the prefix matched up to node, root first."""
        return self.tree.segments(node)

    def record_lookup(
        self, prompt_tokens: int, cached_tokens: int, l2_tokens: int = 0, l3_tokens: int = 0
    ) -> None:
        self.tree.record_lookup(prompt_tokens, cached_tokens, l2_tokens, l3_tokens)

    def record_hit(self, node: int) -> None:
        """An admitted request reuses the prefix ending at node."""
        self.tree.record_hit(node)

    def plan_loads(self, tokens: Sequence[int]) -> list[LoadPlan]:
        """Start bringing the part of tokens' prefix held in lower tiers into L1."""
        return []

    def finish_load(self, plan: LoadPlan) -> None:
        """On the engine thread, when a plan's copy has ended: give its pages to the tree."""
        raise AssertionError("no loads without tiers")

    def observe_compute(self, tokens: int, seconds: float) -> None:
        """A forward pass of mostly prefill took this long (what a load competes with)."""
        return None

    def take_events(self) -> list[KVEvent]:
        """KV events since the last call (for the cluster's mirror)."""
        return self.tree.take_events()

    def snapshot(self) -> dict[str, list[bytes]]:
        """Page keys per tier, for a mirror that (re)starts."""
        return self.tree.snapshot()

    def stats(self) -> TreeStats:
        return self.tree.stats()

    def tier_stats(self) -> dict[str, Any] | None:
        """Pages, bytes and traffic per tier (None without tiers)."""
        return None

    def close(self) -> None:
        """Stop background work (loads, writes)."""
        return None


class RadixCache(CacheIndex):
    """L1 only: evicted pages are dropped."""

    def __init__(self, page_size: int, seed: bytes = b"", record_events: bool = False) -> None:
        self.tree = RadixTree(page_size, seed, record_events)

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> int:
        return self.tree.insert(tokens, pages)

    def evict(self, num_pages: int) -> list[int]:
        return self.tree.evict(num_pages).pages

    def flush(self) -> list[int]:
        return self.tree.flush().pages
