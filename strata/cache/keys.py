"""Page keys: the name of a page of KV wherever it lives (a worker's tree, the cluster's
index, the L3 store)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

KEY_BYTES = 16


def page_keys(parent: bytes, tokens: Sequence[int], page_size: int) -> list[bytes]:
    """Chained page keys: key_i = H(key_{i-1} || tokens of page i), starting from `parent`
    (the model's seed for the first page). The same prefix has the same keys on every worker,
    so a key names a page in events, in routing and in the L3 store."""
    keys = []
    for i in range(0, len(tokens) - page_size + 1, page_size):
        data = struct.pack(f"<{page_size}I", *tokens[i : i + page_size])
        parent = hashlib.blake2b(parent + data, digest_size=KEY_BYTES).digest()
        keys.append(parent)
    return keys


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
