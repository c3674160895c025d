"""L3: KV pages as files in a directory that every worker (and the cache service) shares.

One file per page, named by its page key (a hash of the whole token prefix up to and
including that page, seeded with the model's identity; see radix.tree.page_keys), so the
same prefix written by any worker has the same name. A file is a fixed-size JSON header
(model, dtype, page size, layers, KV heads, head dim, payload bytes, an XXH3-64 checksum)
and the page's bytes. Files are written to a temporary name and renamed, so a reader never
sees half a file; a file that is truncated, corrupt or for another model is counted and
never loaded.

`StoreIndex` is the LRU over the directory under a byte budget (deleting files); it rebuilds
itself from the directory at start, so a restarted server starts warm and a full disk is
cleaned. It runs where eviction is decided: in the engine (colocated) or the cache service.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

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


class FileStore:
    """Reads and writes page files. Thread-safe: every call works on its own file."""

    def __init__(self, root: Path | str, fmt: PageFormat) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fmt = fmt
        self._meta = asdict(fmt)
        self._lock = threading.Lock()
        self.errors = 0  # files found bad (each one recomputed instead)

    def path(self, key: bytes) -> Path:
        return key_path(self.root, key)

    def count_present(self, keys: Iterable[bytes]) -> int:
        """How many leading keys have a file (a prefix can only be loaded up to a gap)."""
        n = 0
        for key in keys:
            if not self.path(key).exists():
                break
            n += 1
        return n

    def write(self, key: bytes, page: np.ndarray) -> int:
        """Write one page (its bytes, as uint8) unless a file for it exists; returns the
        bytes written (0 when it existed)."""
        path = self.path(key)
        if path.exists():
            return 0
        data = memoryview(np.ascontiguousarray(page).reshape(-1))  # type: ignore[arg-type]
        assert data.nbytes == self.fmt.page_bytes, "page size does not match the format"
        head = {"magic": MAGIC, **self._meta, "xxh3_64": checksum(data), "key": key.hex()}
        header = json.dumps(head).encode().ljust(HEADER_BYTES)
        assert len(header) == HEADER_BYTES
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(data)
        os.replace(tmp, path)  # atomic: readers see the whole file or none
        return HEADER_BYTES + data.nbytes

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
        problem = self._check(bytes(header), max(got, 0), view, key)
        if problem is not None:
            with self._lock:
                self.errors += 1
            if "model" not in problem:
                path.unlink(missing_ok=True)
            raise CorruptPage(f"{path.name}: {problem}")
        return True

    def _check(self, header: bytes, got: int, view: memoryview, key: bytes) -> str | None:
        try:
            head = json.loads(header.decode().strip() or "{}")
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "unreadable header"
        if head.get("magic") != MAGIC or head.get("key") != key.hex():
            return "not a page file for this key"
        for name, want in self._meta.items():
            if head.get(name) != want:
                return f"written for another model ({name} {head.get(name)!r} != {want!r})"
        if got != view.nbytes:
            return f"truncated ({got} of {view.nbytes} bytes)"
        if checksum(view) != head.get("xxh3_64"):
            return "checksum mismatch"
        return None


class StoreIndex:
    """LRU of the page files in a directory under a byte budget. Thread-safe."""

    def __init__(self, root: Path | str, budget_bytes: int) -> None:
        self.root = Path(root)
        self.budget = budget_bytes
        self._files: OrderedDict[bytes, int] = OrderedDict()  # key -> bytes, oldest first
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

    def _evict_over_budget(self) -> list[bytes]:
        gone = []
        while self.total_bytes > self.budget and self._files:
            key, nbytes = self._files.popitem(last=False)
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
