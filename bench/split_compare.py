"""One run, one machine: `strata bench multiturn` against the split cluster (`strata up`)
and the colocated server (`strata serve`), same conversations, same engine settings.

Usage: python bench/split_compare.py [--conversations 16 --turns 4 --max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from strata.bench.cli import add_bench_args, run_bench  # noqa: E402
from strata.bench.report import table  # noqa: E402
from tests.e2e.server import running_cluster, running_server  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    add_bench_args(ap)
    args = ap.parse_args(["multiturn", *sys.argv[1:]])
    results = []
    with running_server("--dtype", "auto", "--grpc-port", "-1") as url:
        args.url, args.name, args.backend = url, "strata serve (colocated)", "server"
        results.append(run_bench(args))
    print(table(results[-1:]), flush=True)
    with running_cluster("--dtype", "auto", "--decode", "1") as (url, _):
        args.url, args.name = url, "strata up (gateway + cache + 1 decode worker)"
        results.append(run_bench(args))
    print()
    print(f"multiturn: {args.conversations} conversations x {args.turns} turns, system prompt "
          f"~{args.system_tokens} tokens, max_tokens {args.max_tokens}")  # fmt: skip
    print(table(results))
    ratio = results[1]["output_tokens_per_s"] / results[0]["output_tokens_per_s"]
    print(f"\nsplit / colocated output tokens/s: {ratio:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
