"""L3: KV pages in a store that every worker (and the cache service) shares: files in a
directory (`FileStore`) or keys in Redis/Valkey (`strata.kv.redis_store.RedisStore`).

A page is named by its page key (a hash of the whole token prefix up to and including that
page, seeded with the model's identity and KV layout; see radix.tree.page_keys), so the same
prefix written by any worker has the same name. A stored page is a fixed-size JSON header
(model, dtype, page size, layers, KV heads, head dim, payload bytes, an XXH3-64 checksum) and
the page's bytes. A page that is truncated, corrupt or for another model is counted and
never loaded: the reader recomputes it.

`StoreIndex` is the LRU over a directory under a byte budget (deleting files); it rebuilds
itself from the directory at start, so a restarted server starts warm and a full disk is
cleaned. It runs where eviction is decided: in the engine (colocated) or the cache service.
Redis enforces its own budget (maxmemory with an LRU policy).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import xxhash

log = logging.getLogger(__name__)

HEADER_BYTES = 512
MAGIC = "strata-kv-page/3"  # 3: pages carry their key summaries (row page_size)
SUFFIX = ".kv"


class CorruptPage(ValueError):
    """A page file that must not be loaded (truncated, bad checksum, another model)."""


@dataclass(frozen=True)
class PageFormat:
    """What a page file must match to be loaded."""

    model: str  # the model's identity (name and a fingerprint of config and weights)
    dtype: str
    page_size: int
    layers: int
    kv_heads: int
    head_dim: int
    page_bytes: int


def checksum(data: memoryview) -> int:
    """XXH3-64 of a page: ~10x faster than CRC32 here, so it never bounds a load."""
    return int(xxhash.xxh3_64_intdigest(data))


def key_path(root: Path, key: bytes) -> Path:
    name = key.hex()
    return root / name[:2] / f"{name}{SUFFIX}"


def page_header(fmt: PageFormat, key: bytes, data: memoryview) -> bytes:
    """The fixed-size header stored before a page's bytes."""
    assert data.nbytes == fmt.page_bytes, "page size does not match the format"
    head = {"magic": MAGIC, **asdict(fmt), "xxh3_64": checksum(data), "key": key.hex()}
    header = json.dumps(head).encode().ljust(HEADER_BYTES)
    assert len(header) == HEADER_BYTES
    return header


def page_problem(
    fmt: PageFormat, header: bytes, got: int, view: memoryview, key: bytes
) -> str | None:
    """Why a stored page (its header, and got bytes read into view) must not be loaded."""
    try:
        head = json.loads(header.decode().strip() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "unreadable header"
    if head.get("magic") != MAGIC or head.get("key") != key.hex():
        return "not a page for this key"
    for name, want in asdict(fmt).items():
        if head.get(name) != want:
            return f"written for another model ({name} {head.get(name)!r} != {want!r})"
    if got != view.nbytes:
        return f"truncated ({got} of {view.nbytes} bytes)"
    if checksum(view) != head.get("xxh3_64"):
        return "checksum mismatch"
    return None


def flat(page: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(page).reshape(-1))  # type: ignore[arg-type]


class PageStore(ABC):
    """The L3 store's contract. Thread-safe. A page that cannot be had (missing, bad, or the
    store unreachable) is never an error to the caller: it is recomputed."""

    fmt: PageFormat
    errors: int  # pages found bad (each one recomputed instead)

    @abstractmethod
    def count_present(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are stored (a prefix can only be loaded up to a gap)."""

    def has(self, key: bytes) -> bool:
        return self.count_present([key]) == 1

    @abstractmethod
    def write_many(self, keys: Sequence[bytes], pages: Sequence[np.ndarray]) -> list[int | None]:
        """Store pages (uint8) unless stored already; per page the bytes written (0: it was
        there; None: the write failed, and was logged)."""

    @abstractmethod
    def read_many(self, keys: Sequence[bytes], dests: Sequence[np.ndarray]) -> int:
        """Fill dests (one page each, uint8, contiguous) from the keys' pages; returns how
        many leading pages landed (it stops at a missing or bad one; no later write lands
        in a dest once it returns)."""

    def hold(self, keys: Sequence[bytes], priority: int, ttl: float) -> None:  # noqa: B027
        """Keep these pages (present or still to be written) at a retention priority for ttl
        seconds, where the store evicts by itself (Redis); a directory's pages are held by
        its StoreIndex, whoever owns it."""

    def close(self) -> None:  # noqa: B027 (optional: a store with nothing to release)
        """Release the store's threads and connections."""


class FileStore(PageStore):
    """Page files in a directory; reads run READERS at a time (reads and checksums release
    the GIL). Every call works on its own file."""

    READERS = 2

    def __init__(self, root: Path | str, fmt: PageFormat) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fmt = fmt
        self._lock = threading.Lock()
        self.errors = 0
        self._readers = ThreadPoolExecutor(self.READERS, thread_name_prefix="strata-l3-read")

    def path(self, key: bytes) -> Path:
        return key_path(self.root, key)

    def count_present(self, keys: Sequence[bytes]) -> int:
        n = 0
        for key in keys:
            if not self.path(key).exists():
                break
            n += 1
        return n

    def write_many(self, keys: Sequence[bytes], pages: Sequence[np.ndarray]) -> list[int | None]:
        out: list[int | None] = []
        for key, page in zip(keys, pages, strict=True):
            try:
                out.append(self.write(key, page))
            except OSError as exc:  # full disk, or the directory was cleaned under us
                log.warning("L3 write of %s failed: %s", key.hex(), exc)
                out.append(None)
        return out

    def write(self, key: bytes, page: np.ndarray) -> int:
        """Write one page unless a file for it exists; returns the bytes written (0 when it
        existed)."""
        path = self.path(key)
        if path.exists():
            return 0
        data = flat(page)
        header = page_header(self.fmt, key, data)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(data)
        os.replace(tmp, path)  # atomic: readers see the whole file or none
        return HEADER_BYTES + data.nbytes

    def read_many(self, keys: Sequence[bytes], dests: Sequence[np.ndarray]) -> int:
        reads = [self._readers.submit(self._read_one, k, d) for k, d in zip(keys, dests)]
        landed = len(reads)
        for i, read in enumerate(reads):
            if not read.result():
                landed = i
                break
        # NOTE: after a missing or bad file the pages from there on are recomputed into (or
        # handed back): reads not started are cancelled and those running are waited for,
        # so no late read writes into a page once this returns.
        for read in reads[landed:]:
            read.cancel()
        futures.wait(reads)
        return landed

    def _read_one(self, key: bytes, dest: np.ndarray) -> bool:
        try:
            return self.read_into(key, dest)
        except CorruptPage as exc:
            log.warning("L3 page not loaded (recomputed): %s", exc)
        except OSError as exc:
            log.warning("L3 read failed (recomputed): %s", exc)
        return False

    def read_into(self, key: bytes, out: np.ndarray) -> bool:
        """Fill out (one page, uint8, contiguous) from the key's file. False when there is no
        file; CorruptPage (and the file is removed unless it is another model's) when it
        must not be loaded."""
        path = self.path(key)
        view = memoryview(out.reshape(-1))  # type: ignore[arg-type]
        header = bytearray(HEADER_BYTES)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            got = os.readv(fd, [header, view]) - HEADER_BYTES  # one call for both parts
        finally:
            os.close(fd)
        problem = page_problem(self.fmt, bytes(header), max(got, 0), view, key)
        if problem is not None:
            with self._lock:
                self.errors += 1
            if "model" not in problem:
                path.unlink(missing_ok=True)
            raise CorruptPage(f"{path.name}: {problem}")
        return True

    def close(self) -> None:
        self._readers.shutdown(wait=False, cancel_futures=True)


class L3Index(Protocol):
    """What the cache service asks of the L3 store's index: routing (count_present), the
    workers' KV events (add, touch, remove) and its figures. StoreIndex (a directory) and
    strata.kv.redis_store.RedisIndex."""

    @property
    def budget(self) -> int: ...
    @property
    def total_bytes(self) -> int: ...
    @property
    def evicted(self) -> int: ...
    def __len__(self) -> int: ...
    def count_present(self, keys: Sequence[bytes]) -> int: ...
    def add(self, key: bytes, nbytes: int) -> list[bytes]: ...
    def touch(self, keys: Sequence[bytes]) -> None: ...
    def remove(self, keys: Sequence[bytes]) -> None: ...
    def hold(self, keys: Sequence[bytes], priority: int, ttl: float) -> None: ...


class StoreIndex:
    """LRU of the page files in a directory under a byte budget, retention priorities first:
    over the budget, the least recently used file that holds no priority goes, and only
    when every file holds one, the lowest priority's least recently used. Thread-safe."""

    def __init__(self, root: Path | str, budget_bytes: int) -> None:
        self.root = Path(root)
        self.budget = budget_bytes
        self._files: OrderedDict[bytes, int] = OrderedDict()  # key -> bytes, oldest first
        self._held: dict[bytes, tuple[int, float]] = {}  # key -> (priority, monotonic until)
        self._lock = threading.Lock()
        self.total_bytes = 0
        self.evicted = 0
        self._scan()

    def __contains__(self, key: bytes) -> bool:
        return key in self._files

    def __len__(self) -> int:
        return len(self._files)

    def count_present(self, keys: Iterable[bytes]) -> int:
        n = 0
        for key in keys:
            if key not in self._files:
                break
            n += 1
        return n

    def add(self, key: bytes, nbytes: int) -> list[bytes]:
        """Record a written file (most recently used); returns the keys evicted for it."""
        with self._lock:
            old = self._files.pop(key, None)
            self.total_bytes += nbytes - (old or 0)
            self._files[key] = nbytes
            return self._evict_over_budget()

    def touch(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            for key in keys:
                if key in self._files:
                    self._files.move_to_end(key)

    def remove(self, keys: Iterable[bytes]) -> None:
        """Forget files found missing or bad (someone else deleted them)."""
        with self._lock:
            for key in keys:
                self.total_bytes -= self._files.pop(key, 0)
                self._held.pop(key, None)

    def hold(self, keys: Iterable[bytes], priority: int, ttl: float) -> None:
        """Hold these pages' files (present or still to be written) at a retention priority
        for ttl seconds; a higher priority that still holds stays (as in the radix tree)."""
        now = time.monotonic()
        with self._lock:
            for key in keys:
                held, until = self._held.get(key, (0, 0.0))
                held = held if until > now else 0
                if priority > held:
                    self._held[key] = (priority, now + ttl)
                elif priority == held:
                    self._held[key] = (held, max(until, now + ttl))

    def _level(self, key: bytes, now: float) -> int:
        priority, until = self._held.get(key, (0, 0.0))
        return priority if until > now else 0

    def _evict_over_budget(self) -> list[bytes]:
        gone = []
        now = time.monotonic()
        while self.total_bytes > self.budget and self._files:
            key = next((k for k in self._files if not self._level(k, now)), None)
            if key is None:  # every file holds a priority: the lowest, least recently used
                key = min(self._files, key=lambda k: self._level(k, now))
            nbytes = self._files.pop(key)
            self._held.pop(key, None)
            self.total_bytes -= nbytes
            key_path(self.root, key).unlink(missing_ok=True)
            gone.append(key)
        self.evicted += len(gone)
        return gone

    def _scan(self) -> None:
        """Index the files already there (oldest first), clear stale temporary files, and
        enforce the budget."""
        found = []
        if self.root.exists():
            for sub in self.root.iterdir():
                if not sub.is_dir():
                    continue
                for f in sub.iterdir():
                    if f.name.startswith("."):
                        f.unlink(missing_ok=True)  # a writer died between write and rename
                        continue
                    if f.suffix != SUFFIX:
                        continue
                    try:
                        st = f.stat()
                        found.append((st.st_mtime, bytes.fromhex(f.stem), st.st_size))
                    except (OSError, ValueError):
                        continue
        for _, key, size in sorted(found):
            self._files[key] = size
            self.total_bytes += size
        with self._lock:
            gone = self._evict_over_budget()
        if found:
            log.info(
                "L3 store %s: %d pages (%.1f MB) found, %d evicted over budget",
                self.root,
                len(found),
                self.total_bytes / 1e6,
                len(gone),
            )
