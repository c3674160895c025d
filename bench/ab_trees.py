"""Two source trees of strata side by side in one run (a change against its base): each one's
`strata serve` in turn, its single-stream time per token (n-gram drafts on and off) and its
multi-turn throughput, rounds alternating so drift on a shared machine hits both alike.

Usage: git worktree add /tmp/base <commit>
       python bench/ab_trees.py --trees /tmp/base . [--rounds 2] [--conversations 8]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from serve_latency import served  # bench/, this script's folder

from launch.local import free_port
from strata.bench.cli import add_bench_args, run_bench


@contextlib.contextmanager
def serve_tree(tree: Path, *flags: str, timeout: float = 240.0) -> Iterator[str]:
    """`strata serve` from the source tree `tree` (its packages first on the path)."""
    port = free_port()
    cmd = [sys.executable, "-m", "launch.cli", "serve", "--port", str(port), "--grpc-port", "-1"]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([*cmd, *flags], cwd=tree, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"{tree}: serve exited\n{log.read().decode()[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{tree}: no /health in {timeout:g} s")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_bench_args(ap)
    ap.add_argument("--trees", nargs=2, type=Path, required=True, help="base tree, changed tree")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    a = ap.parse_args(["multiturn", *sys.argv[1:]])
    figures: dict[tuple[str, str], list[float]] = {}
    for _ in range(a.rounds):
        for tree in a.trees:
            for drafts in ("ngram", "none"):
                with serve_tree(tree, "--speculative-algorithm", drafts) as url:
                    itl = served(url, a.new_tokens, 2)["itl"]
                    figures.setdefault((str(tree), f"single stream, drafts {drafts}"), []).extend(
                        1 / t for t in itl
                    )
                    if drafts == "ngram":
                        a.url, a.name, a.backend = url, str(tree), "server"
                        out = run_bench(a)["output_tokens_per_s"]
                        key = (str(tree), f"multi-turn {a.conversations} x {a.turns}")
                        figures.setdefault(key, []).append(out)
    base, changed = (str(t) for t in a.trees)
    print(f"\n{'workload':<30} {'base':>10} {'changed':>10} {'ratio':>7}   (tok/s, medians)")
    for workload in dict.fromkeys(w for _, w in figures):
        b = statistics.median(figures[(base, workload)])
        c = statistics.median(figures[(changed, workload)])
        print(f"{workload:<30} {b:>10.1f} {c:>10.1f} {c / b:>6.2f}x")
    print("\nevery sample (tok/s):")
    for (tree, workload), values in figures.items():
        print(f"  {tree}  {workload}: " + " ".join(f"{v:.1f}" for v in values))


if __name__ == "__main__":
    main()
