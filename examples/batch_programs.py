"""A batch of programs (64 by default) run concurrently with run_batch; they share one
system prompt, which the server's radix cache computes once.

    python examples/batch_programs.py --url http://127.0.0.1:30000 [--programs 64]
"""

from __future__ import annotations

import argparse
import time

import httpx

import strata.lang as sl

SYSTEM = (
    "You are a terse classifier. For each item you are given, you answer with a single "
    "word naming its category, chosen from: fruit, animal, tool, color. " * 3
)
ITEMS = ["apple", "tiger", "hammer", "blue", "banana", "eagle", "wrench", "green"]
CATEGORIES = ["fruit", "animal", "tool", "color"] * 2


@sl.function
def classify(s, item: str):
    s += sl.system(SYSTEM)
    s += sl.user(f"Item: {item}")
    s += sl.assistant(sl.select("category", choices=["fruit", "animal", "tool", "color"]))
    s += sl.user("Describe it in three words.")
    s += sl.assistant(sl.gen("words", max_tokens=8, stop="\n", temperature=0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--programs", type=int, default=64)
    args = ap.parse_args()
    sl.set_default_backend(sl.RuntimeEndpoint(args.url))
    n = args.programs
    items = [ITEMS[i % len(ITEMS)] for i in range(n)]
    start = time.perf_counter()
    states = classify.run_batch([{"item": i} for i in items], num_threads=args.threads)
    elapsed = time.perf_counter() - start
    assert len(states) == n and all(s["category"] for s in states)
    right = sum(s["category"] == CATEGORIES[i % len(ITEMS)] for i, s in enumerate(states))
    hit = httpx.get(f"{args.url}/health", timeout=10).json()["radix_cache_stats"]["hit_rate"]
    print(f"{n} programs in {elapsed:.1f}s; {right}/{n} categories right; cache hit rate {hit:.2f}")


if __name__ == "__main__":
    main()
