"""Decode throughput of strata vs transformers' generate, and model load times.

Every figure comes from this one process on this machine (load times from fresh
subprocesses). Usage: python bench/decode_speed.py [--new-tokens 64] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from strata.bench import run_like_an_engine_process
from strata.config import KVPoolConfig, ModelConfig
from strata.engine.generate import generate_greedy_batch
from strata.engine.runner import ModelRunner
from strata.model.loader import EMBEDDED_FILE, embedded_gguf

PROMPT_LEN = 64


def prompts(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return [torch.randint(100, 10000, (PROMPT_LEN,), generator=g).tolist() for _ in range(batch)]


def decode_rate(run, batch: int, new_tokens: int) -> float:
    """Decode tokens/s: time(new_tokens) - time(1 token) removes the prefill."""
    run(batch, 2)
    t0 = time.perf_counter()
    run(batch, 1)
    t1 = time.perf_counter()
    run(batch, new_tokens)
    t2 = time.perf_counter()
    return batch * (new_tokens - 1) / ((t2 - t1) - (t1 - t0))


def hf_runner(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        embedded_gguf().parent, gguf_file=EMBEDDED_FILE, dtype=dtype
    ).eval()

    def run(batch: int, n: int) -> None:
        ids = torch.tensor(prompts(batch))
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )

    return run


def strata_runner(dtype: str, quantization: str):
    runner = ModelRunner.from_config(
        ModelConfig(dtype=dtype, quantization=quantization), KVPoolConfig(num_pages=1024)
    )
    return lambda batch, n: generate_greedy_batch(runner, prompts(batch), n)


def load_seconds(cache: str) -> float:
    code = (
        "import time;t=time.perf_counter();"
        "from strata.config import *;from strata.engine.runner import ModelRunner;"
        "ModelRunner.from_config(ModelConfig(),KVPoolConfig(num_pages=64));"
        "print(time.perf_counter()-t)"
    )
    env = dict(os.environ, STRATA_CACHE_DIR=cache)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    run_like_an_engine_process()
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    systems = {
        "transformers float32": lambda: hf_runner(torch.float32),
        "transformers bfloat16": lambda: hf_runner(torch.bfloat16),
        "strata float32": lambda: strata_runner("float32", "none"),
        "strata bfloat16": lambda: strata_runner("bfloat16", "none"),
        "strata bfloat16 + int4 weights": lambda: strata_runner("bfloat16", "int4"),
    }
    runs = {name: make() for name, make in systems.items()}
    # NOTE: systems take turns within every round, so a slow spell of this shared machine
    # hits all of them alike; the median round is reported.
    samples: dict[str, dict[str, list[float]]] = {
        n: {f"batch {b}": [] for b in batches} for n in runs
    }
    for i in range(args.rounds):
        for name, run in runs.items():
            for b in batches:
                samples[name][f"batch {b}"].append(decode_rate(run, b, args.new_tokens))
        print(f"round {i + 1}/{args.rounds} done", flush=True)
    results = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in samples.items()}
    with tempfile.TemporaryDirectory() as cache:
        loads = {"first start s": load_seconds(cache), "cached start s": load_seconds(cache)}
    print(
        f"\ndecode tokens/s ({args.new_tokens} new tokens, prompt {PROMPT_LEN}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} rounds)"
    )
    base = results["transformers float32"]
    print(f"{'system':34}" + "".join(f"{f'batch {b}':>12}{'vs HF fp32':>12}" for b in batches))
    for name, r in results.items():
        cells = "".join(
            f"{r[f'batch {b}']:12.1f}{r[f'batch {b}'] / base[f'batch {b}']:11.2f}x" for b in batches
        )
        print(f"{name:34}{cells}")
    print(
        f"\nembedded model load: first start {loads['first start s']:.1f}s, "
        f"cached start {loads['cached start s']:.1f}s"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"decode_tokens_per_s": results, "samples": samples, "load": loads}, f, indent=2
            )


if __name__ == "__main__":
    main()
