"""Decode steps over a shared prompt, in process: the same batch with the shared pages read
once for the batch (cpu_kernels.shared_pages: AMX tiles or AVX2) and per sequence, alternating in
one process (best of 3 each). Embedded model; every sequence's table starts with the same
pages (as the radix cache lays out a shared system prompt), then its own.

Usage: PYTHONPATH=. python bench/shared_prefix.py [--quantization int4]
       [--cases 8,400,100 16,400,100 ...]   (batch, shared tokens, own tokens)
"""

from __future__ import annotations

import argparse

import strata.kernels.cpu.attention as ck
from bench.decode_steps import step_ms
from strata.bench import run_like_an_engine_process
from strata.config import KVPoolConfig, ModelConfig
from strata.engine.runner import ModelRunner


def main() -> None:
    run_like_an_engine_process()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quantization", default="int4", choices=["none", "int4"])
    ap.add_argument("--cases", nargs="+", default=["8,400,100", "16,400,100", "32,400,100"])
    a = ap.parse_args()
    runner = ModelRunner.from_config(
        ModelConfig(dtype="bfloat16", quantization=a.quantization), KVPoolConfig(16, 4096)
    )
    print(f"shared kernel available: {ck.shared_decode_available()}")
    minimum = ck.MIN_SHARED_PAGES
    for case in a.cases:
        batch, shared, own = map(int, case.split(","))
        best: dict[str, list[float]] = {"once": [], "per sequence": []}
        for _ in range(3):
            for mode in best:
                ck.MIN_SHARED_PAGES = minimum if mode == "once" else 1 << 30
                best[mode].append(step_ms(runner, batch, own, 12, shared))
        ck.MIN_SHARED_PAGES = minimum
        print(
            f"batch {batch}, {shared} shared + {own} own tokens: read once "
            f"{min(best['once']):.2f} ms, per sequence {min(best['per sequence']):.2f} ms",
            flush=True,
        )


if __name__ == "__main__":
    main()
