"""One run, one machine: `strata bench multiturn` against strata serve with and without the
radix cache, without n-gram speculation, and with int4 weights, llama-cpp-python's server on
the embedded model's Q4_1 GGUF (when installed: `make peers`), and the transformers baseline
on the same conversations.

Usage: python bench/multiturn_compare.py [--conversations 16 --turns 4 --max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

from launch.local import running_server
from launch.peers import has_llama_cpp, llama_cpp_server
from strata.bench.cli import add_bench_args, run_bench
from strata.bench.report import table


def main() -> None:
    ap = argparse.ArgumentParser()
    add_bench_args(ap)
    ap.add_argument("--serve-args", default="", help="extra flags for strata serve")
    args = ap.parse_args(["multiturn", *sys.argv[1:]])
    results = []
    systems = [
        ("strata serve (radix cache)", []),
        ("strata serve --disable-radix-cache", ["--disable-radix-cache"]),
        ("strata serve --speculative-algorithm none", ["--speculative-algorithm", "none"]),
        # stated apart: int4 weights (bf16 activations), as llama.cpp's Q4_1 row
        ("strata serve --quantization int4", ["--quantization", "int4"]),
    ]
    for name, flags in systems:
        extra = ["--dtype", "auto", *flags, *args.serve_args.split()]
        with running_server(*extra) as url:
            args.url, args.name, args.backend = url, name, "server"
            results.append(run_bench(args))
            with urllib.request.urlopen(url + "/health", timeout=10) as r:
                spec = json.load(r).get("speculative") or {}
            results[-1]["spec_accepted"] = spec.get("accepted_tokens", 0)
            results[-1]["spec_drafted"] = spec.get("draft_tokens", 0)
        print(table(results[-1:]), flush=True)
    if has_llama_cpp():
        with llama_cpp_server() as url:
            args.url, args.name = url, "llama-cpp-python server (Q4_1)"
            results.append(run_bench(args))
        print(table(results[-1:]), flush=True)
    args.backend = "transformers"
    results.append(run_bench(args))
    print()
    print(
        f"multiturn: {args.conversations} conversations x {args.turns} turns, system prompt "
        f"~{args.system_tokens} tokens, max_tokens {args.max_tokens}"
    )
    print(table(results))
    for r in results:
        if r.get("spec_drafted"):
            print(
                f"{r['system']}: n-gram drafts {r['spec_drafted']} tokens, "
                f"{r['spec_accepted'] / r['spec_drafted']:.0%} kept"
            )
    base = {r["system"]: r["output_tokens_per_s"] for r in results}
    cached = results[0]["output_tokens_per_s"]
    ratios = [
        f"{r['system']} {cached / r['output_tokens_per_s']:.2f}x"
        if r["output_tokens_per_s"]
        else f"{r['system']} failed ({r.get('errors')} errors)"
        for r in results[1:]
    ]
    print("\nstrata serve (radix cache) vs: " + "; ".join(ratios))
    for i in (2, 3):  # without speculation; int4
        own = results[i]["output_tokens_per_s"]
        print(
            f"{results[i]['system']} vs: "
            + "; ".join(
                f"{r['system']} {own / r['output_tokens_per_s']:.2f}x"
                for r in results[4:]
                if r["output_tokens_per_s"]
            )
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "tok_s": base}, indent=2))


if __name__ == "__main__":
    main()
