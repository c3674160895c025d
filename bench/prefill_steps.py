"""Time of one prefill forward (ModelRunner.forward) in process: `sequences` prompts of `new`
tokens each, over `cached` tokens of their own already in the pool, as a conversation's next
turn arrives (cached 0: fresh prompts). Embedded model, bfloat16 activations. Beside it,
the same forward with the prefill attention of the torch reference (gather + SDPA) in place
of the CPU kernel (cpu_kernels.paged_prefill), alternating in one process.

Usage: PYTHONPATH=. python bench/prefill_steps.py [--quantization auto] [--steps 5]
       [--shapes 540x33x15 540x25x1 0x430x1]   (cached x new x sequences)
"""

from __future__ import annotations

import argparse
import statistics
import time

import strata.kernels.cpu.attention as ck
from strata.batch import SequenceChunk
from strata.bench import run_like_an_engine_process
from strata.config import KVPoolConfig, ModelConfig
from strata.engine.runner import ModelRunner


def prefill_ms(runner: ModelRunner, cached: int, new: int, sequences: int, steps: int) -> float:
    """Median ms of a forward that computes `new` tokens of each of `sequences` prompts
    after their `cached` tokens (computed once before, in pages of their own)."""
    prompts = [[100 + (i * 31 + j) % 5000 for j in range(cached + new)] for i in range(sequences)]
    tables = [runner.pool.alloc(runner.pages_for(cached + new)) for _ in prompts]
    try:
        if cached:
            for p, t in zip(prompts, tables):
                runner.forward([SequenceChunk(p[:cached], 0, t)])
        times = []
        for _ in range(steps + 1):  # one warm forward
            start = time.perf_counter()
            runner.forward([SequenceChunk(p[cached:], cached, t) for p, t in zip(prompts, tables)])
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:]) * 1e3
    finally:
        for t in tables:
            runner.pool.free(t)


def main() -> None:
    run_like_an_engine_process()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quantization", default="auto", choices=["auto", "none", "int4"])
    ap.add_argument("--shapes", nargs="+", default=["540x33x15", "540x25x1", "0x430x1"])
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    runner = ModelRunner.from_config(
        ModelConfig(dtype="bfloat16", quantization=a.quantization), KVPoolConfig(num_pages=4096)
    )
    kernel = ck.paged_prefill
    print(f"{'cached x new x sequences':>26} {'ms a forward':>13} {'reference attention':>20}")
    for shape in a.shapes:
        cached, new, sequences = (int(x) for x in shape.split("x"))
        ms = prefill_ms(runner, cached, new, sequences, a.steps)
        ck.paged_prefill = lambda *args, **kw: None  # type: ignore[assignment]
        ref = prefill_ms(runner, cached, new, sequences, a.steps)
        ck.paged_prefill = kernel
        print(f"{shape:>26} {ms:13.1f} {ref:20.1f}", flush=True)


if __name__ == "__main__":
    main()
