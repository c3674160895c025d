"""Time to healthy of `strata serve` and of a `strata up` cluster, from each source tree in
turn (a change against its base), rounds alternating so drift on a shared machine hits both
alike: the time from starting the process to /health answering ok, with the embedded model
converted and the kernels built already (one start of each first, not counted).

Usage: git worktree add /tmp/base <commit>
       python bench/startup.py --trees /tmp/base . [--rounds 2]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launch.local import _wait_healthy, free_port

COMMANDS = {
    "strata serve": ["serve", "--grpc-port", "-1", "--num-pages", "64"],
    "strata up": ["up", "--grpc-port", "0"],
}


def time_to_healthy(tree: Path, args: list[str], timeout: float = 240.0) -> float:
    """Seconds from starting `strata <args>` in tree to its /health saying ok; stops it."""
    port = free_port()
    cmd = [sys.executable, "-m", "launch.cli", *args, "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryDirectory() as store, tempfile.TemporaryFile() as log:
        if args[0] == "up":  # a fresh L3: another run's pages change nothing at start, but
            cmd += ["--hicache-storage-dir", store]  # reading them takes time
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=tree, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(f"http://127.0.0.1:{port}", proc, log, timeout, poll=0.05)
            return time.monotonic() - start
        finally:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: `strata up` stops its children first
            proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trees", nargs="+", type=Path, default=[Path(".")])
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    for tree in a.trees:  # converts the model and builds the kernels where needed
        time_to_healthy(tree, COMMANDS["strata serve"])
    times: dict[tuple[str, Path], list[float]] = {}
    for _ in range(a.rounds):
        for tree in a.trees:
            for name, args in COMMANDS.items():
                times.setdefault((name, tree), []).append(time_to_healthy(tree, args))
    for (name, tree), ts in times.items():
        runs = " / ".join(f"{t:.1f}" for t in ts)
        print(f"{name:14} {str(tree):24} {runs} s (median {statistics.median(ts):.1f})")


if __name__ == "__main__":
    main()
