"""KV transfer throughput: KVChannel (scattered pages sent from the pool, received into other
scattered reserved pages) vs raw gloo send/recv of the same number of bytes in one message
from one contiguous buffer, between two processes on loopback.

Usage: python bench/kv_transfer.py [--pages 64] [--rounds 41]
The page shape is the embedded model's (30 layers, 3 KV heads, head dim 64, page size 16, bf16).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import time

import torch

from strata.kv.pool import KVCache
from strata.kv.transfer import KVChannel

SHAPE = dict(num_layers=30, page_size=16, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def go(channel: KVChannel, rank: int) -> None:
    """A one-byte handshake so both sides start a timed round together."""
    flag = torch.zeros(1, dtype=torch.uint8)
    work = channel.group.send([flag], 0, 999) if rank == 1 else channel.group.recv([flag], 1, 999)
    work.wait()


def run(rank: int, port: int, pages: int, rounds: int, out) -> None:
    torch.set_num_threads(1)  # two processes share the machine
    kv = KVCache(num_pages=2 * pages + 8, device="cpu", **SHAPE)
    kv.data.normal_()
    channel = KVChannel(kv, "127.0.0.1", port, rank, timeout=60)
    src = list(range(0, 2 * pages, 2))  # scattered pages, as in a real pool
    nbytes = pages * kv.bytes_per_page
    raw = torch.empty(nbytes, dtype=torch.uint8)
    times: dict[str, list[float]] = {"kv": [], "raw": []}
    for r in range(rounds):
        for kind in ("kv", "raw") if r % 2 else ("raw", "kv"):  # neither always goes first
            go(channel, rank)
            start = time.perf_counter()
            if kind == "kv":
                channel.send(src) if rank == 0 else channel.recv(src[::-1])
            else:
                tag = 10_000
                op = channel.group.send if rank == 0 else channel.group.recv
                op([raw], 1 - rank, tag).wait()
            times[kind].append(time.perf_counter() - start)
    if rank == 1:
        out.put((nbytes, times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=41)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=run, args=(r, port, args.pages, args.rounds, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    nbytes, times = out.get(timeout=600)
    for p in procs:
        p.join(60)
    kv_s, raw_s = statistics.median(times["kv"]), statistics.median(times["raw"])
    # NOTE: each round times both back to back, so its ratio cancels the slow spells of this
    # shared machine better than a ratio of medians
    ratios = sorted(r / k for r, k in zip(times["raw"], times["kv"]))
    q1, q3 = ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4]
    print(f"{args.pages} pages = {nbytes / 1e6:.1f} MB, median of {args.rounds} rounds")
    print("| transfer | GB/s | vs raw gloo (median of rounds; quartiles) |\n|---|---:|---:|")
    print(f"| raw gloo send/recv, one message | {nbytes / raw_s / 1e9:.2f} | 1.00x |")
    print(
        f"| KVChannel, scattered pages from and into the pool | {nbytes / kv_s / 1e9:.2f} | "
        f"{statistics.median(ratios):.2f}x ({q1:.2f}-{q3:.2f}) |"
    )


if __name__ == "__main__":
    main()
