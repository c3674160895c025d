"""One run, one machine: `strata bench multiturn` against the colocated server (`strata
serve`) and the split cluster (`strata up`) without prefill workers, with one prefill worker
(conditional disaggregation: short uncached suffixes are prefilled on the decode worker) and
with every prompt prefilled remotely; same conversations, same engine settings.

Usage: python bench/split_compare.py [--conversations 16 --turns 4 --max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

from launch.local import running_cluster, running_server
from strata.bench.cli import add_bench_args, run_bench
from strata.bench.report import table


def main() -> None:
    ap = argparse.ArgumentParser()
    add_bench_args(ap)
    args = ap.parse_args(["multiturn", *sys.argv[1:]])
    results = []
    with running_server("--dtype", "auto", "--grpc-port", "-1") as url:
        args.url, args.name, args.backend = url, "strata serve (colocated)", "server"
        results.append(run_bench(args))
    print(table(results[-1:]), flush=True)
    clusters = [
        (["--prefill", "0"], "strata up, 1 decode worker"),
        (["--prefill", "1"], "strata up, 1 prefill + 1 decode (conditional)"),
        (
            ["--prefill", "1", "--local-prefill-tokens", "-1"],
            "strata up, 1 prefill + 1 decode (every prompt transferred)",
        ),
    ]
    for flags, name in clusters:
        with running_cluster("--dtype", "auto", "--decode", "1", *flags) as (url, _):
            args.url, args.name = url, name
            results.append(run_bench(args))
            transfer = httpx.get(f"{url}/health", timeout=10).json()["kv_transfer"]
            results[-1]["kv_transfer"] = transfer
            print(table(results[-1:]), transfer, flush=True)
    print()
    print(
        f"multiturn: {args.conversations} conversations x {args.turns} turns, system prompt "
        f"~{args.system_tokens} tokens, max_tokens {args.max_tokens}"
    )
    print(table(results))
    base = results[0]["output_tokens_per_s"]
    ratios = {r["system"]: r["output_tokens_per_s"] / base for r in results[1:]}
    for name, ratio in ratios.items():
        t = next(r for r in results if r["system"] == name)["kv_transfer"]
        print(
            f"{name}: {ratio:.2f}x colocated; {t['transfers']} KV transfers, "
            f"{t['bytes'] / 1e6:.1f} MB at {t['gb_per_s']} GB/s"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
