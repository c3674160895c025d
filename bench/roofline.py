"""How close in-process decode comes to this machine's limits, measured in one process:
batch 1 against the weight-bandwidth roofline (bytes of weights / measured memory-read
bandwidth), batch 32 against the bf16 GEMM roofline (2 x params x batch / measured bf16
GEMM FLOP/s: issue 14's figure) and against the roofline proper, the lower of the GEMM
FLOP/s and the bandwidth times the step's intensity (FLOPs per byte of weights read): a
batch-32 bf16 step does 32 FLOPs per byte of weights, so it is bound by memory, not by the
GEMM, wherever the bandwidth is below GEMM FLOP/s / 32 (72 GB/s at 2.3 TFLOP/s).
Usage: python bench/roofline.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.decode_speed import decode_rate
from strata.bench import run_like_an_engine_process
from strata.config import KVPoolConfig, ModelConfig, cpu_isa
from strata.engine.generate import generate_greedy_batch
from strata.engine.runner import ModelRunner
from strata.model.linear import Int4Linear, Int8Linear


def read_bandwidth(rounds: int) -> float:
    """Bytes/s of reading a 1 GiB float32 tensor (a sum over it, every thread). NOTE: not
    bfloat16, whose sum is bound by its conversions here (19.6 vs 30.9 GB/s, measured): a
    low bandwidth would flatter every figure below."""
    x = torch.ones(2**28, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(rounds * 3):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / min(times)


def gemm_flops(rounds: int, dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of torch's 2048^3 product in dtype (float32: MKL's sgemm, the machine's FMA
    rate as well as a library reaches it; bfloat16 runs on oneDNN's kernels only where the
    CPU has them: 0.007 TFLOP/s on AVX2)."""
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    a @ b
    times = []
    for _ in range(rounds * 3):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 2048**3 / min(times)


def weight_bytes(runner: ModelRunner) -> tuple[int, int]:
    """(bytes a decode step reads, parameters): every linear layer's weights (the embedding
    table is only indexed)."""
    nbytes = params = 0
    model = runner.model
    linears = [model.lm_head]
    for layer in model.layers:
        linears += [layer.attn.qkv, layer.attn.o_proj, layer.mlp.gate_up, layer.mlp.down]
    for lin in linears:
        if isinstance(lin, (Int4Linear, Int8Linear)):  # packed codes + scales
            nbytes += lin.nbytes()
            params += lin.out_features * lin.in_features
        else:
            n = lin.weight.numel()  # an opaque oneDNN tensor (or a shape on "meta") too
            nbytes += n * 2
            params += n
    return nbytes, params


def main() -> None:
    run_like_an_engine_process()
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()
    bw, bf16 = read_bandwidth(a.rounds), gemm_flops(a.rounds)
    fma = gemm_flops(a.rounds, torch.float32)
    flops = max(bf16, fma)  # the faster of the two GEMMs is the compute roofline
    print(
        f"{torch.get_num_threads()} threads ({cpu_isa()} kernels): memory read "
        f"{bw / 1e9:.1f} GB/s, bf16 GEMM {bf16 / 1e12:.3f} TFLOP/s, float32 GEMM (FMA) "
        f"{fma / 1e12:.3f} TFLOP/s"
    )
    print(
        f"{'weights':16} {'MB':>6} {'batch 1 tok/s':>14} {'of bandwidth roofline':>22} "
        f"{'batch 32 tok/s':>15} {'of GEMM roofline':>17} {'of roofline':>12}"
    )
    for quant in ("none", "auto"):
        runner = ModelRunner.from_config(
            ModelConfig(dtype="bfloat16", quantization=quant), KVPoolConfig(num_pages=1024)
        )
        nbytes, params = weight_bytes(runner)

        def run(batch: int, n: int, r: ModelRunner = runner) -> None:
            generate_greedy_batch(r, [[100 + i] * 64 for i in range(batch)], n)

        b1 = statistics.median(decode_rate(run, 1, a.new_tokens) for _ in range(a.rounds))
        b32 = statistics.median(decode_rate(run, 32, a.new_tokens) for _ in range(a.rounds))
        roof1 = bw / nbytes  # tokens/s if a step only read the weights once
        roof32 = flops / (2 * params)  # tokens/s if every step were one GEMM
        # the roofline: FLOP/s the lower of the GEMM's and bandwidth x FLOPs per byte read
        roof = min(flops, bw * (2 * params * 32) / nbytes) / (2 * params)  # tokens/s
        name = "bfloat16" if quant == "none" else f"default ({runner.model.quantization})"
        print(
            f"{name:16} {nbytes / 1e6:6.0f} {b1:14.1f} {b1 / roof1:21.0%} "
            f"{b32:15.1f} {b32 / roof32:16.0%} {b32 / roof:11.0%}"
        )


if __name__ == "__main__":
    main()
