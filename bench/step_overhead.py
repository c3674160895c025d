"""How much of an engine step is not the model forward (scheduling, sampling, outputs):
the most an overlap scheduler (building step N+1 while step N's forward runs) could save.
Embedded model, one process, decode batches of 1, 8 and 16 sequences.

Usage: python bench/step_overhead.py [--dtype bfloat16] [--steps 40]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from strata.config import KVPoolConfig, ModelConfig
from strata.engine.engine import Engine
from strata.engine.runner import ModelRunner
from strata.sampling.params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args()
    runner = ModelRunner.from_config(ModelConfig(dtype=a.dtype), KVPoolConfig(16, 2048))
    in_forward = [0.0]
    forward = runner.run

    def timed(*args: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return forward(*args, **kw)
        finally:
            in_forward[0] += time.perf_counter() - start

    runner.run = timed  # type: ignore[method-assign]
    engine = Engine(runner)
    params = SamplingParams(max_new_tokens=10**6, temperature=0, ignore_eos=True)
    for batch in (1, 8, 16):
        for r in range(batch):
            engine.submit(list(range(100 + r, 164 + r)), params, lambda ev: None)
        engine._drain()  # the step loop's inbox, run by hand here
        for _ in range(8):  # prefill, then warm decode steps
            engine.step()
        in_forward[0] = 0.0
        start = time.perf_counter()
        for _ in range(a.steps):
            engine.step()
        total = time.perf_counter() - start
        outside = 100 * (total - in_forward[0]) / total
        print(
            f"decode batch {batch}: {total / a.steps * 1e3:.1f} ms per step, of which "
            f"{outside:.1f}% outside the forward",
            flush=True,
        )
        for req in list(engine.scheduler.running):
            engine._finish(req, "abort")


if __name__ == "__main__":
    main()
