"""The experts of a mixture-of-experts layer in one C call (cpu_gemm.c's moe_avx2) against
the grouped path (each expert an MLP of strata's linear layers, one call each), at every
ISA level the machine runs."""

from __future__ import annotations

import pytest
import torch

from strata.model.layers import MLP, SparseMoE, _avx2_layout
from strata.model.linear import make_linear


def moe_layer(dtype: torch.dtype, quantization: str, experts: int = 6) -> SparseMoE:
    torch.manual_seed(0)
    hidden, inter = 64, 96
    mlps = [
        MLP(
            make_linear((torch.randn(2 * inter, hidden) / 8).to(dtype), None, quantization, dtype),
            make_linear((torch.randn(hidden, inter) / 10).to(dtype), None, quantization, dtype),
        )
        for _ in range(experts)
    ]
    router = make_linear((torch.randn(experts, hidden) * 2).to(dtype), None, "none", dtype)
    return SparseMoE(router, mlps, 2, True)


@pytest.mark.parametrize("tokens", [1, 5, 40])
@pytest.mark.parametrize(
    "dtype,quantization",
    [(torch.bfloat16, "none"), (torch.bfloat16, "int4"), (torch.float32, "int4")],
)
def test_the_experts_in_one_call_equal_them_one_by_one(dtype, quantization, tokens, cpu_isa_level):
    if cpu_isa_level == "none":  # no AVX2 kernel: the experts run one by one
        if dtype == torch.float32:  # (int4 with float32 rows has no other kernel)
            return
        assert moe_layer(dtype, quantization).fused is None
        return
    moe = moe_layer(dtype, quantization)
    if dtype == torch.float32:  # int4 with float32 rows: the AVX2 kernel at every level
        assert moe.fused is not None
    if moe.fused is None:
        # some expert's products are not on the AVX2 kernel here: bfloat16 weights packed
        # for oneDNN where the CPU has bfloat16 kernels, int4 on AVX-512's kernel
        layers = [lin for e in moe.experts for lin in (e.gate_up, e.down)]
        assert any(_avx2_layout(lin) is None for lin in layers)
        return
    x = torch.randn(tokens, 64).to(dtype)
    fused = moe(x)
    moe.fused = None
    grouped = moe(x)
    assert fused.dtype == grouped.dtype == dtype
    # bfloat16: the grouped path rounds each expert's weighted rows and their sum; one call
    # sums in float32 and rounds once
    tol = 2e-2 * grouped.float().abs().clamp(min=1) if dtype == torch.bfloat16 else 1e-5
    assert ((fused.float() - grouped.float()).abs() <= tol).all()


def test_experts_of_two_layouts_run_one_by_one(cpu_isa_level):
    moe = moe_layer(torch.bfloat16, "int4")
    mixed = [*moe.experts[:-1], moe_layer(torch.bfloat16, "none").experts[0]]
    if cpu_isa_level == "avx2":
        assert moe.fused is not None
        assert SparseMoE(moe.router, mixed, 2, True).fused is None  # int4 beside bf16 pairs
