"""Load bandwidth of the KV tiers, in-process, on the embedded model's page shape:

- L2 -> L1 (a prefix found in host memory, loaded by the mover thread) vs one plain memory
  copy of the same bytes;
- L3 -> L1 (page files read into L2 with their checksums, then copied into L1) vs plainly
  reading the same files into a buffer.

Each round measures all four back to back, in alternating order; the median of the
per-round ratios is reported with its quartiles. Files are read from the page cache, as a
recently written store is (a cold disk is slower for both sides alike).

Usage: python bench/tier_bandwidth.py [--pages 128 --rounds 21]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from strata.cache.hierarchy import TieredCache
from strata.config import resolve_dtype
from strata.kv.mover import page_bytes
from strata.kv.pool import KVCache, PagePool
from strata.kv.store import FileStore, PageFormat, StoreIndex, key_path
from strata.model.loader import read_config, resolve_checkpoint
from strata.model.registry import model_spec


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=21)
    a = ap.parse_args()
    spec = model_spec(read_config(resolve_checkpoint(None)))
    dtype = resolve_dtype("auto", "cpu")
    n, ps = a.pages, 16
    kv = KVCache(spec.num_layers, 2 * n, ps, spec.num_kv_heads, spec.head_dim, dtype, "cpu")
    kv.data.copy_(torch.randn(kv.data.shape).to(dtype))
    store_dir = tempfile.TemporaryDirectory(prefix="strata-bw-")
    fmt = PageFormat(
        "bench",
        str(dtype),
        ps,
        spec.num_layers,
        spec.num_kv_heads,
        spec.head_dim,
        kv.bytes_per_page,
    )
    pool = PagePool(2 * n)
    cache = TieredCache(
        kv,
        pool,
        2 * n,
        "write_through",
        b"bench",
        FileStore(store_dir.name, fmt),
        StoreIndex(store_dir.name, 1 << 40),
    )
    tokens = list(range(n * ps))
    cache.insert(tokens, pool.alloc(n))  # write-through: an L2 copy and a file per page
    cache.mover._writes.submit(lambda: None).result()
    files = [key_path(Path(store_dir.name), k) for k in cache.tree.keys_of(tokens)]
    nbytes = n * kv.bytes_per_page
    src = page_bytes(cache.l2)[:n].copy()
    dst = np.empty_like(src)
    file_buf = bytearray(files[0].stat().st_size * n)

    def memcpy() -> float:
        t = time.perf_counter()
        np.copyto(dst, src)
        return time.perf_counter() - t

    def read_files() -> float:
        view, off = memoryview(file_buf), 0
        t = time.perf_counter()
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                off += fh.readinto(view[off:])
        return time.perf_counter() - t

    mover_seconds: dict[bool, list[float]] = {False: [], True: []}

    def load(drop_l2: bool) -> float:
        pool.free(cache.evict(n))  # L1 -> L2 (free: the pages have L2 copies)
        if drop_l2:
            cache.host_pool.free(cache._evict_host(2 * n))
        t = time.perf_counter()
        plans = cache.plan_loads([*tokens, 0])
        assert plans and plans[0].source == ("l3" if drop_l2 else "l2"), plans
        for p in plans:
            p.done.wait()
            cache.finish_load(p)
        elapsed = time.perf_counter() - t
        mover_seconds[drop_l2].append(plans[0].seconds)
        assert cache.match(tokens).length == n * ps
        return elapsed

    tests = {
        "memcpy": memcpy,
        "l2": lambda: load(False),
        "files": read_files,
        "l3": lambda: load(True),
    }
    times: dict[str, list[float]] = {k: [] for k in tests}
    for r in range(a.rounds):
        for name in tests if r % 2 == 0 else reversed(list(tests)):
            times[name].append(tests[name]())
    cache.close()
    gbs = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
    l2 = quartiles([m / t for m, t in zip(times["memcpy"], times["l2"])])
    l3 = quartiles([f / t for f, t in zip(times["files"], times["l3"])])
    print(
        f"{n} pages of {kv.bytes_per_page} bytes ({nbytes / 1e6:.1f} MB, {dtype}), "
        f"{a.rounds} rounds"
    )
    print("| load | GB/s | baseline | GB/s | ratio (median; quartiles) |")
    print("|---|---:|---|---:|---:|")
    print(
        f"| L2 -> L1 | {gbs['l2']:.2f} | memcpy | {gbs['memcpy']:.2f} | "
        f"{l2[1]:.2f}x ({l2[0]:.2f}-{l2[2]:.2f}) |"
    )
    print(
        f"| L3 -> L1 | {gbs['l3']:.2f} | read files | {gbs['files']:.2f} | "
        f"{l3[1]:.2f}x ({l3[0]:.2f}-{l3[2]:.2f}) |"
    )
    inside = {
        k: statistics.median(v) / statistics.median(times["l3" if k else "l2"])
        for k, v in mover_seconds.items()
    }
    print(
        f"share of the load spent copying/reading on the mover thread: L2 {inside[False]:.0%},"
        f" L3 {inside[True]:.0%} (the rest: planning, hand-off, attaching to the tree)"
    )
    store_dir.cleanup()


if __name__ == "__main__":
    main()
