"""A radix tree node (strata/cache/tree.py): its edge, its pages in each tier, its links."""

from __future__ import annotations


class Node:
    __slots__ = (
        "id",
        "key",
        "pages",
        "host",
        "keys",
        "parent",
        "children",
        "lock",
        "last_access",
        "depth",
        "hits",
        "priority",
        "priority_until",
    )

    def __init__(self, node_id: int, key: tuple[int, ...], keys: list[bytes], parent: Node | None):
        self.id = node_id
        self.key = key  # the tokens on the edge into this node (len = len(keys) * page_size)
        self.keys = keys  # one page key per page
        self.pages: list[int] | None = None  # L1 page ids, None when not in L1
        self.host: list[int] | None = None  # L2 page ids, None when not in L2
        self.parent = parent
        self.children: dict[tuple[int, ...], Node] = {}  # keyed by the child's first page
        self.lock = 0  # number of holders; NOTE: a locked node is never evicted from any tier
        self.last_access = 0
        self.depth: int = (parent.depth + len(key)) if parent else 0  # tokens from the root
        self.hits = 0  # admissions that matched this node (write_through_selective)
        self.priority = 0  # retention: evicted after lower priorities while it holds
        self.priority_until = 0.0  # time.monotonic() when it stops holding
