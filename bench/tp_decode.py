"""Tensor parallelism on CPU: decode time of the embedded model on one rank and over N gloo
ranks (processes on loopback), one process driving each, and the latency of the gloo
all-reduce that every layer pays twice per step.

Usage: python bench/tp_decode.py [--tp 3] [--dtype bfloat16] [--tokens 64]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from strata.config import KVPoolConfig, ModelConfig
from strata.engine.generate import generate_greedy_batch
from strata.engine.runner import ModelRunner
from strata.model.tp import free_port


def decode_ms(tp: int, dtype: str, tokens: int, batch: int) -> float:
    """Milliseconds per decode step of `batch` sequences over a 64-token prompt."""
    runner = ModelRunner.from_config(ModelConfig(dtype=dtype, tp_size=tp), KVPoolConfig(16, 512))
    prompts = [list(range(100 + i, 164 + i)) for i in range(batch)]
    try:
        generate_greedy_batch(runner, prompts, 4)  # warm
        start = time.perf_counter()
        generate_greedy_batch(runner, prompts, tokens)
        return (time.perf_counter() - start) / tokens * 1000
    finally:
        runner.close()


def _reduce(rank: int, size: int, port: int, hidden: int, out: dict[int, float]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size
    )
    x = torch.randn(1, hidden, dtype=torch.bfloat16)
    for _ in range(50):
        dist.all_reduce(x)
    start = time.perf_counter()
    for _ in range(500):
        dist.all_reduce(x)
    if rank == 0:
        out[size] = (time.perf_counter() - start) / 500 * 1e6
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    for size in sorted({2, a.tp}):
        result = mp.Manager().dict()
        mp.spawn(_reduce, args=(size, free_port(), 576, result), nprocs=size)
        print(f"gloo all-reduce of one token's hidden state, {size} ranks: {result[size]:.0f} us")
    for batch in (1, 8):
        one = decode_ms(1, a.dtype, a.tokens, batch)
        many = decode_ms(a.tp, a.dtype, a.tokens, batch)
        print(
            f"batch {batch}: tp 1 {one:.1f} ms/step, tp {a.tp} {many:.1f} ms/step "
            f"({many / one:.1f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
