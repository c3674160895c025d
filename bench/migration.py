"""What request migration costs a stream: `strata up --prefill 0 --decode 2` (embedded model),
8 greedy streams of N tokens, run whole, then again with the decode worker holding most of
them SIGKILLed once each has its first token (the gateway goes on with them on the other
worker after the tokens they have). Reports each run's wall time, its streams' longest gap
between two events, and whether the texts match.

Usage: python bench/migration.py [--tokens 96 --streams 8]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from launch.local import running_cluster


def stream(url: str, tokens: int) -> tuple[str, float]:
    """The text and the longest gap (s) between two events after the first."""
    body = {
        "text": "Tell me about lighthouses.",
        "stream": True,
        "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True},
    }
    times, text = [], ""
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                times.append(time.perf_counter())
                text = json.loads(line[5:])["text"]
    gaps = [b - a for a, b in zip(times, times[1:])]
    return text, max(gaps, default=0.0)


def decode_pids(port: str) -> dict[str, int]:
    """Decode worker address -> pid, from /proc (the workers `strata up` started)."""
    out = {}
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmd.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"decode" in args and b"--port" in args:
            p = args[args.index(b"--port") + 1].decode()
            out[f"127.0.0.1:{p}"] = int(cmd.parent.name)
    return out


def run(url: str, n: int, tokens: int, kill: bool) -> tuple[float, list[str], list[float]]:
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(stream, url, tokens) for _ in range(n)]
        if kill:
            while True:
                workers = httpx.get(f"{url}/health", timeout=30).json()["workers"]
                running = {w["worker"]: w.get("running_requests", 0) for w in workers}
                if sum(running.values()) >= n:
                    break
                time.sleep(0.02)
            victim = max(running, key=lambda w: running[w])
            os.kill(decode_pids(url)[victim], signal.SIGKILL)
        results = [f.result() for f in futures]
    return time.perf_counter() - start, [t for t, _ in results], [g for _, g in results]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--streams", type=int, default=8)
    a = ap.parse_args()
    flags = ["--prefill", "0", "--decode", "2", "--disable-hierarchical-cache"]
    with running_cluster(*flags, "--dtype", "float32") as (url, _):
        stream(url, 4)  # warm-up
        whole = run(url, a.streams, a.tokens, kill=False)
        cut = run(url, a.streams, a.tokens, kill=True)
        migrated = httpx.get(f"{url}/health", timeout=30).json()["migrated_requests"]
    for name, (wall, _, gaps) in (("whole", whole), ("one worker killed", cut)):
        print(
            f"{name:18s} wall {wall:6.2f} s  longest gap per stream: median "
            f"{statistics.median(gaps) * 1e3:6.0f} ms, max {max(gaps) * 1e3:6.0f} ms"
        )
    print(f"streams migrated: {migrated}; texts equal to the whole run's: {cut[1] == whole[1]}")
    print(f"extra ms on the worst migrated stream: {(max(cut[2]) - max(whole[2])) * 1e3:.0f}")


if __name__ == "__main__":
    main()
