"""L3 backends side by side: pages written to and restored from the file store and Redis,
in-process, on the embedded model's page shape (the pipelined batches of `RedisStore`, the
reader threads of `FileStore`, each with its checksums). Starts its own redis-server on
loopback (no persistence, an LRU budget larger than the pages). Rounds alternate the order;
the medians are reported, with the restore ratio per round.

Usage: python bench/l3_backends.py [--pages 256 --rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from launch.local import free_port, start_redis
from strata.config import resolve_dtype
from strata.kv.pool import KVCache
from strata.kv.redis_store import RedisStore
from strata.kv.store import FileStore, PageFormat, PageStore
from strata.model.loader import read_config, resolve_checkpoint
from strata.model.registry import model_spec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args()
    spec = model_spec(read_config(resolve_checkpoint(None)))
    dtype = resolve_dtype("auto", "cpu")
    kv = KVCache(spec.num_layers, 1, 16, spec.num_kv_heads, spec.head_dim, dtype, "cpu")
    layout = spec.num_layers, spec.num_kv_heads, spec.head_dim, kv.bytes_per_page
    fmt = PageFormat("bench", str(dtype), 16, *layout)
    pages = [np.random.randint(0, 255, kv.bytes_per_page, dtype=np.uint8) for _ in range(a.pages)]
    dests = [np.empty_like(p) for p in pages]
    port = free_port()
    server = start_redis(port, maxmemory="8gb")
    folder = tempfile.TemporaryDirectory(prefix="strata-l3-")
    stores: dict[str, PageStore] = {
        "file": FileStore(folder.name, fmt),
        "redis": RedisStore(f"redis://127.0.0.1:{port}/0", fmt),
    }
    times: dict[str, dict[str, list[float]]] = {n: {"write": [], "read": []} for n in stores}
    try:
        for r in range(a.rounds):
            keys = [r.to_bytes(4, "little") + i.to_bytes(12, "little") for i in range(a.pages)]
            order = list(stores) if r % 2 == 0 else list(stores)[::-1]
            for name in order:
                store = stores[name]
                start = time.perf_counter()
                store.write_many(keys, pages)
                times[name]["write"].append(time.perf_counter() - start)
                start = time.perf_counter()
                landed = store.read_many(keys, dests)
                times[name]["read"].append(time.perf_counter() - start)
                assert landed == a.pages and np.array_equal(dests[-1], pages[-1])
    finally:
        server.kill()
        folder.cleanup()
    mb = a.pages * kv.bytes_per_page / 1e6
    print(f"{a.pages} pages of {kv.bytes_per_page / 1e3:.0f} kB ({dtype}), {a.rounds} rounds")
    for name, t in times.items():
        w, rd = statistics.median(t["write"]), statistics.median(t["read"])
        print(
            f"{name:6s} write {a.pages / w:8.0f} pages/s ({mb / w / 1e3:.2f} GB/s)   "
            f"restore {a.pages / rd:8.0f} pages/s ({mb / rd / 1e3:.2f} GB/s)"
        )
    ratios = [f / r for f, r in zip(times["file"]["read"], times["redis"]["read"], strict=True)]
    print(f"restore, redis vs file: {statistics.median(ratios):.2f}x (median of rounds)")


if __name__ == "__main__":
    main()
