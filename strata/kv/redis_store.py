"""L3 in Redis or Valkey (`--hicache-storage-backend redis --hicache-storage-url URL`).

A page is one key, `strata:kv:<page key hex>`: the page key hashes the token prefix seeded with
the model's identity and KV layout (dtype, page size, layers, KV heads, head dim), so pages of
another model or layout never share a name. Its value is the file store's record (header with
an XXH3-64 checksum, then the page's bytes), so a truncated, corrupt or foreign value is
never loaded: it is deleted and the page recomputed. Reads and writes go BATCH pages per
round trip (MGET, a pipeline of SET NX) and existence checks EXISTS_BATCH keys per round
trip: one for any prompt under 8k tokens. (One round trip for a 64-page read was measured
2x slower than eight of 8 pages: large replies cost more than round trips on loopback.)

The budget is Redis's own: `maxmemory` with an LRU policy (`allkeys-lru`) evicts the least
recently read pages; strata neither counts nor deletes them (a page evicted between a lookup
and its read is recomputed). Give strata a database of its own (the URL's /db): `len` counts
the database's keys.

Redis down or slow (timeouts of `timeout` seconds) never fails a request: a failed call
counts as a miss (pages recomputed, writes dropped) and the store stays quiet for DOWN_SECONDS
before it tries again, so requests do not wait on a dead server; when Redis is back, L3 is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import redis

from strata.kv.store import HEADER_BYTES, PageFormat, PageStore, flat, page_header, page_problem

log = logging.getLogger(__name__)

PREFIX = b"strata:kv:"
BATCH = 8  # pages per MGET or SET pipeline (~3 MB of the embedded model's bf16 pages)
EXISTS_BATCH = 512  # keys per pipeline of EXISTS
DOWN_SECONDS = 1.0  # after a failed call, treat Redis as down this long
T = TypeVar("T")


def check_url(url: str | None) -> str:
    """The URL, or ValueError naming what a Redis URL looks like."""
    if not url or not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(
            "--hicache-storage-backend redis needs --hicache-storage-url "
            "redis://[:password@]host:port/db (rediss:// for TLS, or unix:///path.sock)"
        )
    return url


class RedisLink:
    """A Redis client whose failed calls count as misses, with a quiet time after each."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        self.url = check_url(url)
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self.failures = 0  # calls that could not reach Redis
        self._down_until = 0.0
        self._lock = threading.Lock()

    def call(self, fn: Callable[[Any], T], default: T) -> T:
        """fn(client), or default while Redis is down or when the call fails."""
        if time.monotonic() < self._down_until:
            return default
        try:
            result = fn(self.client)
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                self.failures += 1
                was_up = self._down_until == 0.0
                self._down_until = time.monotonic() + DOWN_SECONDS
            if was_up:
                log.warning("L3 at %s unreachable (pages are recomputed): %s", self.safe_url, exc)
            return default
        if self._down_until:
            self._down_until = 0.0
            log.warning("L3 at %s is back", self.safe_url)
        return result

    @property
    def safe_url(self) -> str:
        """The URL without its password."""
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rsplit('@', 1)[-1]}"

    def close(self) -> None:
        self.client.close()


def name(key: bytes) -> bytes:
    return PREFIX + key.hex().encode()


def present(client: redis.Redis, keys: Sequence[bytes]) -> int:
    """How many leading keys Redis holds: EXISTS pipelined, EXISTS_BATCH keys a round trip."""
    n = 0
    for start in range(0, len(keys), EXISTS_BATCH):
        batch = keys[start : start + EXISTS_BATCH]
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.exists(name(key))
        flags = pipe.execute()
        got = next((i for i, f in enumerate(flags) if not f), len(flags))
        n += got
        if got < len(batch):
            break
    return n


class RedisStore(PageStore):
    """The L3 page store in Redis. Thread-safe (redis-py's connection pool)."""

    def __init__(self, url: str, fmt: PageFormat, timeout: float = 2.0) -> None:
        self.link = RedisLink(url, timeout)
        self.fmt = fmt
        self.errors = 0
        self._lock = threading.Lock()

    def count_present(self, keys: Sequence[bytes]) -> int:
        return self.link.call(lambda client: present(client, keys), 0) if keys else 0

    def write_many(self, keys: Sequence[bytes], pages: Sequence[np.ndarray]) -> list[int | None]:
        values = []
        for key, page in zip(keys, pages, strict=True):
            data = flat(page)
            values.append(page_header(self.fmt, key, data) + data.tobytes())

        def run(client: redis.Redis) -> list[int | None]:
            out: list[int | None] = []
            for start in range(0, len(keys), BATCH):
                pipe = client.pipeline(transaction=False)
                for key, value in zip(keys[start : start + BATCH], values[start : start + BATCH]):
                    pipe.set(name(key), value, nx=True)  # a page is written once
                done = pipe.execute()
                out += [len(v) if ok else 0 for ok, v in zip(done, values[start:], strict=False)]
            return out

        return self.link.call(run, [None] * len(keys))

    def read_many(self, keys: Sequence[bytes], dests: Sequence[np.ndarray]) -> int:
        def run(client: redis.Redis) -> int:
            landed = 0
            for start in range(0, len(keys), BATCH):
                batch = keys[start : start + BATCH]
                values = client.mget([name(k) for k in batch])
                for key, value, dest in zip(batch, values, dests[start:], strict=False):
                    if not isinstance(value, bytes) or not self._land(client, key, value, dest):
                        return landed
                    landed += 1
            return landed

        return self.link.call(run, 0)

    def _land(self, client: redis.Redis, key: bytes, value: bytes, dest: np.ndarray) -> bool:
        """Copy a page's value into dest if it checks out; a bad one is counted and deleted
        (unless it is another model's, which is not ours to delete)."""
        view = memoryview(dest.reshape(-1))  # type: ignore[arg-type]
        payload = memoryview(value)[HEADER_BYTES:]
        if payload.nbytes == view.nbytes:
            view[:] = payload
        problem = page_problem(self.fmt, value[:HEADER_BYTES], payload.nbytes, view, key)
        if problem is None:
            return True
        with self._lock:
            self.errors += 1
        log.warning("L3 page %s not loaded (recomputed): %s", key.hex(), problem)
        if "model" not in problem:
            client.delete(name(key))
        return False

    def close(self) -> None:
        self.link.close()


class RedisIndex:
    """The cache service's view of a Redis L3 for routing and stats (the StoreIndex calls it
    uses). Redis keeps the LRU and the budget itself, so add/touch/remove do nothing."""

    def __init__(self, url: str, timeout: float = 1.0) -> None:
        self.link = RedisLink(url, timeout)

    def count_present(self, keys: Sequence[bytes]) -> int:
        return self.link.call(lambda client: present(client, keys), 0) if keys else 0

    def add(self, key: bytes, nbytes: int) -> list[bytes]:
        return []

    def touch(self, keys: Sequence[bytes]) -> None:
        pass

    def remove(self, keys: Sequence[bytes]) -> None:
        pass

    def __len__(self) -> int:
        return int(self.link.call(lambda c: c.dbsize(), 0))

    @property
    def total_bytes(self) -> int:
        return int(self.link.call(lambda c: c.info("memory")["used_memory"], 0))

    @property
    def budget(self) -> int:
        def run(client: redis.Redis) -> int:
            return int(client.config_get("maxmemory").get("maxmemory") or 0)

        return self.link.call(run, 0)

    @property
    def evicted(self) -> int:
        return int(self.link.call(lambda c: c.info("stats")["evicted_keys"], 0))
