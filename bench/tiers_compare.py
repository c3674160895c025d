"""One run, one machine: the KV tiers on a working set several times the L1 budget.

`strata bench sessions` (every session has its own long context; all sessions are open and
up to --concurrency turns run at once) against strata serve with a small L1 pool
(--num-pages): no cache, L1 only, L1 + L2, L1 + L2 + L3 (a fresh store). Reports output
tokens/s, TTFT and the fraction of prompt tokens each tier served (from /health).

Usage: python bench/tiers_compare.py [--conversations 24 --turns 4 --system-tokens 700
       --concurrency 4 --num-pages 320]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import httpx

from launch.local import running_server
from strata.bench.cli import add_bench_args, run_bench
from strata.bench.report import table


def main() -> None:
    ap = argparse.ArgumentParser()
    add_bench_args(ap)
    ap.add_argument("--num-pages", type=int, default=320, help="the L1 budget (16-token pages)")
    ap.add_argument("--hicache-ratio", type=float, default=2.0)
    argv = ["sessions", "--conversations", "24", "--system-tokens", "700", "--concurrency", "4"]
    args = ap.parse_args(argv + sys.argv[1:])
    store = tempfile.TemporaryDirectory(prefix="strata-l3-")
    tiers = ["--enable-hierarchical-cache", "--hicache-ratio", str(args.hicache_ratio)]
    systems = [
        ("no cache", ["--disable-radix-cache"]),
        ("L1 only", []),
        (f"L1 + L2 (ratio {args.hicache_ratio:g})", tiers),
        (
            "L1 + L2 + L3",
            [*tiers, "--hicache-storage-backend", "file", "--hicache-storage-dir", store.name],
        ),
    ]
    results, rates = [], {}
    for name, flags in systems:
        extra = ["--dtype", "auto", "--num-pages", str(args.num_pages), *flags]
        with running_server(*extra) as url:
            args.url, args.name, args.backend = url, name, "server"
            results.append(run_bench(args))
            stats = httpx.get(f"{url}/health", timeout=30).json()["radix_cache_stats"]
        rates[name] = {t: stats.get(f"{t}_hit_rate") for t in ("l1", "l2", "l3")}
        print(table(results[-1:]), rates[name], flush=True)
    print(
        f"\nsessions: {args.conversations} x {args.turns} turns, own context ~"
        f"{args.system_tokens} tokens, max_tokens {args.max_tokens}, {args.concurrency} in "
        f"flight; L1 {args.num_pages} pages"
    )
    print(table(results))
    print("\nprompt tokens served per tier:")
    for name, r in rates.items():
        print(
            f"  {name:28s} "
            + "  ".join(f"{t} {v:.3f}" if v is not None else f"{t} -" for t, v in r.items())
        )
    by = {r["system"]: r for r in results}
    l1, l3 = by["L1 only"], by["L1 + L2 + L3"]
    print(
        f"\nL1+L2+L3 vs L1 only: {l3['output_tokens_per_s'] / l1['output_tokens_per_s']:.2f}x "
        f"output tok/s, TTFT p50 {l3['ttft_p50_s'] / l1['ttft_p50_s']:.2f}x"
    )
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "tier_rates": rates}, indent=2))
    store.cleanup()


if __name__ == "__main__":
    main()
