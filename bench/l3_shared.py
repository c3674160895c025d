"""Two `strata up` clusters sharing one Redis as L3 (embedded model, loopback): the time to
first token on cluster B of prompts cluster A prefilled (B loads their pages from Redis)
against prompts nobody saw (B computes them), in the same run, alternating.

Usage: python bench/l3_shared.py [--prompts 12 --entries 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import redis

from launch.local import free_port, running_cluster, start_redis


def prompt(i: int, entries: int) -> str:
    return " ".join(f"Log {i}.{j}: the keeper saw ship {i * 31 + j} pass." for j in range(entries))


def ttft(url: str, text: str) -> tuple[float, dict]:
    """Seconds to the first streamed token, and the final meta_info."""
    body = {"text": text, "stream": True, "sampling_params": {"max_new_tokens": 4}}
    start, first, last = time.perf_counter(), None, {}
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if first is None and event.get("output_ids"):
                first = time.perf_counter() - start
            last = event["meta_info"]
    assert first is not None
    return first, last


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--entries", type=int, default=60, help="prompt length (~15 tokens each)")
    a = ap.parse_args()
    port = free_port()
    server = start_redis(port, maxmemory="2gb")
    url = f"redis://127.0.0.1:{port}/0"
    tiers = ["--prefill", "0", "--decode", "1"]
    tiers += ["--hicache-storage-backend", "redis", "--hicache-storage-url", url]
    warm, cold, l3 = [], [], []
    try:
        with ExitStack() as stack, ThreadPoolExecutor(2) as pool:
            starts = [running_cluster(*tiers) for _ in range(2)]
            (a_url, _), (b_url, _) = pool.map(stack.enter_context, starts)
            ttft(b_url, prompt(10_000, 4))  # warm-up
            client = redis.Redis(port=port)
            for i in range(a.prompts):
                text = prompt(i, a.entries)
                ttft(a_url, text)
                before, deadline = -1, time.monotonic() + 30
                while (n := client.dbsize()) != before and time.monotonic() < deadline:
                    before = n
                    time.sleep(0.3)  # A's writer threads have caught up
                order = [("warm", text), ("cold", prompt(1000 + i, a.entries))]
                for kind, t in order if i % 2 == 0 else order[::-1]:
                    seconds, meta = ttft(b_url, t)
                    (warm if kind == "warm" else cold).append(seconds)
                    if kind == "warm":
                        l3.append(meta["cached_tokens_by_tier"]["l3"] / meta["prompt_tokens"])
    finally:
        server.kill()
    tokens = meta["prompt_tokens"]
    print(f"{a.prompts} prompts of {tokens} tokens on cluster B")
    for name, xs in (("from A's pages in Redis", warm), ("computed", cold)):
        print(
            f"  {name:24s} TTFT p50 {pct(xs, 0.5) * 1e3:7.1f} ms  p99 {pct(xs, 0.99) * 1e3:7.1f} ms"
        )
    print(f"  share of the warm prompts loaded from L3: {statistics.mean(l3):.2f}")
    print(f"  p50 ratio computed / from L3: {pct(cold, 0.5) / pct(warm, 0.5):.2f}x")


if __name__ == "__main__":
    main()
