"""Time of one decode step (ModelRunner.forward + greedy pick) by batch size and context
length, in process: where a serving step's time goes before the scheduler adds its part.
Embedded model; each batch's prompts are distinct (no shared pages).

Usage: PYTHONPATH=. python bench/decode_steps.py [--quantization none] [--context 64 700]
       [--batches 1 4 8 16] [--steps 15] [--page-size 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

from strata.batch import SequenceChunk
from strata.bench import run_like_an_engine_process
from strata.config import KVPoolConfig, ModelConfig
from strata.engine.runner import ModelRunner
from strata.sampling.sampler import argmax_rows


def step_ms(runner: ModelRunner, batch: int, context: int, steps: int, shared: int = 0) -> float:
    """Median ms of a decode step of `batch` sequences at `context` tokens each, after
    `shared` tokens (whole pages) they all start with in the same pages, as the radix cache
    lays out a shared prompt."""
    ps = runner.page_size
    assert shared % ps == 0, "a shared prefix of whole pages"
    common = runner.pool.alloc(shared // ps)
    prompts = [[100 + (i * 31 + j) % 5000 for j in range(context)] for i in range(batch)]
    tables = [
        list(common) + runner.pool.alloc(runner.pages_for(context + steps + 4)) for _ in prompts
    ]
    try:
        if shared:
            runner.forward([SequenceChunk([7 + j % 5000 for j in range(shared)], 0, common)])
        last = [
            int(runner.forward([SequenceChunk(p, shared, t)])[0].argmax())
            for p, t in zip(prompts, tables)
        ]
        lens, times = [shared + context] * batch, []
        for i in range(steps + 3):  # 3 warm steps
            start = time.perf_counter()
            chunks = [SequenceChunk([tok], n, t) for tok, n, t in zip(last, lens, tables)]
            last = argmax_rows(runner.forward(chunks)).tolist()  # the engine's greedy pick
            if i >= 3:
                times.append(time.perf_counter() - start)
            lens = [n + 1 for n in lens]
        return statistics.median(times) * 1e3
    finally:
        for t in tables:
            runner.pool.free(t[len(common) :])
        runner.pool.free(common)


def main() -> None:
    run_like_an_engine_process()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quantization", default="none", choices=["none", "int4"])
    ap.add_argument("--context", type=int, nargs="+", default=[64, 700])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--page-size", type=int, default=16)
    a = ap.parse_args()
    runner = ModelRunner.from_config(
        ModelConfig(dtype="bfloat16", quantization=a.quantization),
        KVPoolConfig(a.page_size, 65536 // a.page_size),
    )
    print(f"{'context':>8} " + " ".join(f"{f'batch {b}':>9}" for b in a.batches) + "  (ms a step)")
    for context in a.context:
        row = [step_ms(runner, b, context, a.steps) for b in a.batches]
        print(f"{context:8d} " + " ".join(f"{ms:9.2f}" for ms in row), flush=True)


if __name__ == "__main__":
    main()
