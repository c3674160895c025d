"""What the radix tree hands out: match results, released pages, KV events, statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class MatchResult(NamedTuple):
    pages: list[int]  # L1 page ids, one per page_size matched tokens
    length: int  # tokens matched in L1 (a multiple of page_size)
    node: int  # handle of the deepest L1 node (0 = root), for lock/unlock
    host_pages: list[int]  # L2 page ids of the L2-only nodes that continue the match
    host_length: int  # tokens matched in L2 past `length`
    host_node: int  # handle of the deepest L2-only node (0 = none)


class Evicted(NamedTuple):
    pages: list[int]  # L1 pages released
    host_pages: list[int]  # L2 pages released with them (L2-only nodes under a dropped node)


class HostDrop(NamedTuple):
    keys: list[bytes]  # page keys of a node dropped from L2
    host_pages: list[int]
    left_tree: bool  # False: only the L2 copy of an L1 node was dropped


class Attached(NamedTuple):
    pages: list[int]  # the caller's L1 pages the tree did not take (it has its own)
    host_pages: list[int]  # the caller's L2 pages the tree did not take


class KVEvent(NamedTuple):
    kind: str  # "stored" | "removed" | "hit" (l3: a read) | "held" (l3: a retention priority)
    tier: str  # "l1" | "l2" | "l3"
    keys: list[bytes]
    priority: int = 0  # "held": the priority, held for ttl seconds
    ttl: float = 0.0


@dataclass(frozen=True)
class TreeStats:
    total_nodes: int
    cached_pages: int  # L1 pages in the tree
    locked_pages: int
    shared_prefix_count: int  # nodes where two or more cached sequences diverge
    avg_sharing_depth: float  # mean depth in tokens of those branch points
    hit_rate: float  # cached prompt tokens / prompt tokens, over all recorded lookups
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the cache (any tier)
    host_pages: int = 0  # L2 pages in the tree (L2-only nodes and backups of L1 nodes)
    l2_tokens: int = 0  # of cached_tokens: loaded from L2
    l3_tokens: int = 0  # of cached_tokens: loaded from the L3 store
