"""CacheIndex: the seam between the engine and wherever the radix tree lives."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from strata.radix.tree import MatchResult, RadixTree, TreeStats


class CacheIndex(ABC):
    """Prefix index of one worker's KV pages. In-process (colocated) or over gRPC (split)."""

    @abstractmethod
    def match(self, tokens: Sequence[int]) -> MatchResult:
        """Longest cached page-aligned prefix of tokens (refreshes its LRU time)."""

    @abstractmethod
    def lock(self, node: int) -> None:
        """Pin a matched prefix against eviction until unlock(node)."""

    @abstractmethod
    def unlock(self, node: int) -> None: ...

    @abstractmethod
    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> int:
        """Cache whole pages; returns how many leading tokens were cached already."""

    @abstractmethod
    def evict(self, num_pages: int) -> list[int]:
        """Release at least num_pages LRU unlocked pages if possible; returns them."""

    @abstractmethod
    def record_lookup(self, prompt_tokens: int, cached_tokens: int) -> None: ...

    @abstractmethod
    def stats(self) -> TreeStats: ...

    @abstractmethod
    def flush(self) -> list[int]:
        """Drop every unlocked page; returns them."""


class LocalCacheIndex(CacheIndex):
    def __init__(self, page_size: int) -> None:
        self.tree = RadixTree(page_size)

    def match(self, tokens: Sequence[int]) -> MatchResult:
        return self.tree.match_prefix(tokens)

    def lock(self, node: int) -> None:
        self.tree.lock(node)

    def unlock(self, node: int) -> None:
        self.tree.unlock(node)

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> int:
        return self.tree.insert(tokens, pages)

    def evict(self, num_pages: int) -> list[int]:
        return self.tree.evict(num_pages)

    def record_lookup(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.tree.record_lookup(prompt_tokens, cached_tokens)

    def stats(self) -> TreeStats:
        return self.tree.stats()

    def flush(self) -> list[int]:
        return self.tree.flush()
