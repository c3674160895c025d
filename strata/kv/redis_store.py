"""L3 in Redis or Valkey (`--hicache-storage-backend redis --hicache-storage-url URL`).

A page is one key, `strata:kv:<page key hex>`: the page key hashes the token prefix seeded with
the model's identity and KV layout (dtype, page size, layers, KV heads, head dim), so pages of
another model or layout never share a name. Its value is the file store's record (header with
an XXH3-64 checksum, then the page's bytes), so a truncated, corrupt or foreign value is
never loaded: it is deleted and the page recomputed. Reads and writes go BATCH pages per
round trip (MGET, a script of SET NX) and existence checks EXISTS_BATCH keys per round
trip: one for any prompt under 8k tokens. (One round trip for a 64-page read was measured
2x slower than eight of 8 pages: large replies cost more than round trips on loopback.)

The budget is Redis's own: `maxmemory` with `maxmemory-policy volatile-lru` evicts the least
recently read pages among those that carry an expiry; strata neither counts nor deletes them
(a page evicted between a lookup and its read is recomputed). Retention priority rides on
that policy: a page is written with an expiry of PLAIN_TTL_S (so it may be evicted), and a
held page (TieredCache.prioritize) has none until its hold ends. The holds live in Redis, two
sorted sets of page name -> when its hold ends (HELD; Redis's clock, so hosts' clocks do not
matter) and -> its priority (LEVEL); every write or hold first gives the pages whose hold
ended their expiry back. When only held pages are left, a page held at priority p that finds
no room takes it from the pages held lowest below p (their holds end, Redis evicts them), as
the file store's index does; a plain page, or one held no higher than all, is refused (and
recomputed when needed) until a hold ends. Under `allkeys-lru` Redis evicts held pages too
(a warning at start says so). Give strata a database of its own (the URL's /db): `len`
counts the database's keys but HELD and LEVEL.

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
HELD = b"strata:held"  # sorted set: held page name -> when its hold ends (Redis's clock, s)
LEVEL = b"strata:held:priority"  # sorted set: held page name -> its retention priority
PLAIN_TTL_S = 30 * 86400  # the expiry of a page not held (volatile-lru evicts only these)
BATCH = 8  # pages per MGET or SET pipeline (~3 MB of the embedded model's bf16 pages)
EXISTS_BATCH = 512  # keys per pipeline of EXISTS
TRIES = 4  # script calls for a write or hold that lower holds make room for (8 pages a call)
DOWN_SECONDS = 1.0  # after a failed call, treat Redis as down this long
T = TypeVar("T")

# Lua run by Redis (one round trip, atomic). KEYS[1] is HELD, KEYS[2] LEVEL, the pages
# follow; ARGV[1] is the plain expiry in ms. Each first gives the pages whose hold ended (at
# most 1024 a call) their expiry back.
_RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local function unhold(page)
  redis.call('PEXPIRE', page, ARGV[1])
  redis.call('ZREM', KEYS[1], page)
  redis.call('ZREM', KEYS[2], page)
end
for _, page in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1024)) do
  unhold(page)
end
local function level(page)  -- the priority that holds the page now (0: none)
  local ends = redis.call('ZSCORE', KEYS[1], page)
  if ends and tonumber(ends) > now then
    return tonumber(redis.call('ZSCORE', KEYS[2], page) or 0)
  end
  return 0
end
local function failed(reply) return type(reply) == 'table' and reply.err ~= nil end
local function yield_below(p)  -- drop holds below p, lowest first, until 8 stored pages lost theirs
  local freed = 0
  for _, low in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. p, 'LIMIT', 0, 256)) do
    freed = freed + redis.call('EXISTS', low)
    unhold(low)
    if freed >= 8 then break end
  end
  return freed
end
"""
# ARGV[2..]: the pages' values. Per page 1: written, 0: there already, -1: refused (only
# pages Redis may not evict are left), -2: refused, but pages held lower than this one lost
# their hold (lowest first, up to 8 stored ones), so a second try finds room. (Redis refuses
# a script's first write only: once the script has written, the writes after it land.)
_WRITE = (
    _RELEASE
    + """
local out = {}
for i = 3, #KEYS do
  local p = level(KEYS[i])
  local ok
  if p > 0 then
    ok = redis.pcall('SET', KEYS[i], ARGV[i - 1], 'NX')
  else
    ok = redis.pcall('SET', KEYS[i], ARGV[i - 1], 'NX', 'PX', ARGV[1])
  end
  if failed(ok) then
    out[i - 2] = (p > 0 and yield_below(p) > 0) and -2 or -1
  elseif ok then out[i - 2] = 1 else out[i - 2] = 0 end
end
return out
"""
)
# ARGV[2]: the priority, ARGV[3]: for how many seconds. As in the radix tree, a higher
# priority that still holds a page stays, and the same one extends its end. Per page 1: held,
# -1: not held (no room to record the hold), -2: not held, but pages held lower lost their
# hold (once a call, up to 8 stored ones), so another try finds room. A page is never made
# unevictable unless HELD records when it is released.
_HOLD = (
    _RELEASE
    + """
local p, ends, out, yielded = tonumber(ARGV[2]), now + tonumber(ARGV[3]), {}, false
for i = 3, #KEYS do
  local page, ok = KEYS[i], true
  local current = level(page)
  if p > current then
    ok = redis.pcall('ZADD', KEYS[1], ends, page)
    if not failed(ok) then ok = redis.pcall('ZADD', KEYS[2], p, page) end
  elseif p == current then
    ok = redis.pcall('ZADD', KEYS[1], 'GT', ends, page)
  end
  if not failed(ok) or redis.call('ZSCORE', KEYS[1], page) then
    redis.call('PERSIST', page)
    out[i - 2] = 1
  else
    yielded = yielded or yield_below(p) > 0
    out[i - 2] = yielded and -2 or -1
  end
end
return out
"""
)


def _making_room(
    script: Callable[[list[bytes]], list[Any]], names: list[bytes]
) -> dict[bytes, int]:
    """Page name -> script's answer for it, calling script again (up to TRIES calls in all)
    on the pages it answered -2 for: lower holds were dropped to make room for them."""
    done: dict[bytes, int] = {}
    for _ in range(TRIES):
        done.update(zip(names, (int(c) for c in script(names)), strict=True))
        names = [n for n in names if done[n] == -2]
        if not names:
            break
    return done


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
        self.refused = 0  # pages Redis had no room for (only held pages were left)
        self._lock = threading.Lock()
        self._write_script = self.link.client.register_script(_WRITE)
        self._hold_script = self.link.client.register_script(_HOLD)
        self._warn_policy()

    def _warn_policy(self) -> None:
        try:  # NOTE: a managed Redis may forbid CONFIG; then nothing is said
            found = self.link.client.config_get("maxmemory-policy").get("maxmemory-policy")
        except (redis.RedisError, OSError):
            return
        if found != "volatile-lru":
            log.warning(
                "L3 at %s runs maxmemory-policy %s: retention priorities hold in L3 only under "
                "volatile-lru",
                self.link.safe_url,
                found,
            )

    def count_present(self, keys: Sequence[bytes]) -> int:
        return self.link.call(lambda client: present(client, keys), 0) if keys else 0

    def write_many(self, keys: Sequence[bytes], pages: Sequence[np.ndarray]) -> list[int | None]:
        data: dict[bytes, bytes] = {}  # page name -> its value
        for key, page in zip(keys, pages, strict=True):
            view = flat(page)
            data[name(key)] = page_header(self.fmt, key, view) + view.tobytes()

        def run(client: redis.Redis) -> list[int | None]:
            def write(names: list[bytes]) -> list[int]:  # SET NX: a page is written once
                args: list[bytes | int] = [PLAIN_TTL_S * 1000, *(data[n] for n in names)]
                return self._write_script([HELD, LEVEL, *names], args, client)

            out: list[int | None] = []
            for start in range(0, len(keys), BATCH):
                batch = [name(k) for k in keys[start : start + BATCH]]
                done = _making_room(write, batch)
                out += [
                    len(data[n]) if done[n] == 1 else 0 if done[n] == 0 else None for n in batch
                ]
            self._count_refused(out.count(None))
            return out

        return self.link.call(run, [None] * len(keys))

    def _count_refused(self, n: int) -> None:
        if not n:
            return
        with self._lock:
            first, self.refused = self.refused == 0, self.refused + n
        if first:
            log.warning(
                "L3 at %s is full of held pages: new pages are not stored until a hold ends",
                self.link.safe_url,
            )

    def hold(self, keys: Sequence[bytes], priority: int, ttl: float) -> None:
        def run(client: redis.Redis) -> None:
            def hold(names: list[bytes]) -> list[int]:
                args = [PLAIN_TTL_S * 1000, priority, ttl]
                return self._hold_script([HELD, LEVEL, *names], args, client)

            for start in range(0, len(keys), EXISTS_BATCH):
                _making_room(hold, [name(k) for k in keys[start : start + EXISTS_BATCH]])

        if keys and priority > 0:
            self.link.call(run, None)

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
    uses). Redis keeps the LRU, the budget and the holds itself, so add/touch/remove/hold do
    nothing."""

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

    def hold(self, keys: Sequence[bytes], priority: int, ttl: float) -> None:
        pass  # the workers hold their pages in Redis themselves (RedisStore.hold)

    def __len__(self) -> int:
        """The database's keys but HELD and LEVEL: the pages."""
        return int(self.link.call(lambda c: c.dbsize() - c.exists(HELD, LEVEL), 0))

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
