"""Linear layers against plain torch: the oneDNN-prepacked path and weight-only int4."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from strata.kernels.cpu import ops as cpu_ops
from strata.kernels.cpu.build import library
from strata.model.linear import (
    Int4Linear,
    Int8Codes,
    Linear,
    _kernel_address,
    can_prepack,
    pack_int4,
    pack_int8,
    pack_pairs,
    quantize_int4,
)


@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_prepacked_bfloat16_linear_equals_f_linear_bit_for_bit(rows):
    w = torch.randn(96, 64, dtype=torch.bfloat16)
    b = torch.randn(96, dtype=torch.bfloat16)
    if not can_prepack(w):
        pytest.skip("this CPU has no oneDNN bfloat16")
    layer = Linear(w, b)
    assert layer.packed and layer.weight.is_mkldnn
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    if layer.address and rows <= cpu_ops.PACKED_ROWS:  # strata's kernels (below)
        assert_within_an_ulp(layer(x), F.linear(x, w, b))
    else:
        assert torch.equal(layer(x), F.linear(x, w, b))


def assert_within_an_ulp(got: torch.Tensor, want: torch.Tensor) -> None:
    """bfloat16 results that differ at most by one rounding (2^-8 relative), and rarely."""
    diff = (got.float() - want.float()).abs()
    assert (diff <= want.float().abs() * 2**-7 + 1e-6).all()
    assert (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("kernel", ["amx_linear_bf16", "gemv_packed_bf16"])
@pytest.mark.parametrize("shape", [(96, 64), (3072, 576), (576, 1536)])
def test_decode_batches_read_the_packed_weight_in_place(shape, kernel):
    """strata's kernels compute a decode batch from oneDNN's packed weight, where the CPU has
    their instructions and oneDNN packs in the layout they know, within a rounding of oneDNN:
    AMX (any rows; 17 and 33 end in a short block of rows), bit-equal to it up to 16 rows
    (it sums in oneDNN's order there), and AVX512-BF16 (1-2 rows)."""
    torch.manual_seed(1)
    w = torch.randn(*shape, dtype=torch.bfloat16) * 0.05
    b = torch.randn(shape[0], dtype=torch.bfloat16)
    layer = Linear(w, b)
    if not layer.address:
        pytest.skip("no AVX512-BF16 here, or oneDNN packs in another layout")
    fn = getattr(library(), kernel)
    for rows in (1, 2, 5, 16, 17, 33) if kernel.startswith("amx") else (1, 2):
        x = torch.randn(rows, shape[1], dtype=torch.bfloat16)
        y = torch.empty(rows, shape[0], dtype=torch.bfloat16)
        rc = fn(x.data_ptr(), layer.address, b.data_ptr(), y.data_ptr(), rows, *shape)
        if rc == -1:
            pytest.skip(f"{kernel} does not run on this CPU")
        want = torch.ops.mkldnn._linear_pointwise(x, layer.weight, b, "none", [None], "")
        assert_within_an_ulp(y, want)
        if kernel.startswith("amx") and rows <= 16:  # oneDNN's order (beyond 32 rows not)
            assert torch.equal(y, want)
    # the load-time check refuses a packed weight that is not the weight it is given
    assert _kernel_address(layer.weight, torch.randn_like(w), b) == 0


def test_float32_linear_is_not_packed():
    w = torch.randn(8, 4)
    layer = Linear(w)
    assert not layer.packed
    x = torch.randn(3, 4)
    assert torch.equal(layer(x), F.linear(x, w))


@pytest.mark.parametrize("rows", [1, 2, 4, 7, 40, 100])  # AVX2: 1 row, 2, buffered; AMX tiles
def test_int4_linear_matches_its_dequantized_weight(rows, cpu_isa_level):
    """Int4Linear at every ISA level this CPU runs (the portable level: ATen's int4 product)
    against float64 over the dequantized weight (w = code * scale + min): float32 rows to
    float32 rounding (AVX2 and up), bfloat16 rows within a rounding of the output (AMX past
    16 rows also rounds each weight to bfloat16)."""
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    b = torch.randn(64)
    q = quantize_int4(w, 32)
    deq = q.dequantize()
    assert (deq - w).abs().max() <= w.abs().max() / 15
    expect_of = lambda x: x.double() @ deq.double().t() + b.to(x.dtype).double()  # noqa: E731
    for dtype in (torch.bfloat16, torch.float32):
        if dtype == torch.float32 and cpu_isa_level == "none":
            with pytest.raises(ValueError, match="AVX2"):
                Int4Linear(q, b.to(dtype), dtype)
            continue
        layer = Int4Linear(q, b.to(dtype), dtype)
        assert layer.strata == (cpu_isa_level != "none")
        x = torch.randn(rows, 128).to(dtype)
        got, expect = layer(x).double(), expect_of(x)
        tol = 1e-5 if dtype == torch.float32 else 2**-7
        assert (got - expect).abs().max() <= tol * expect.abs().max()


def _int8(w: torch.Tensor) -> Int8Codes:
    scale = (w.abs().view(w.shape[0], -1, 32).amax(-1) / 127).to(torch.float16)
    codes = (w.view(w.shape[0], -1, 32) / scale.float()[..., None]).round().clamp(-127, 127)
    return Int8Codes(codes.to(torch.int8).view(w.shape), scale)


@pytest.mark.parametrize("shape", [(96, 64), (576, 1536), (3072, 576)])
def test_avx2_linear_kernels_match_float64(shape, cpu_isa_level):
    """cpu_gemm.c's kernels on each weight layout (bfloat16 pairs, int4, int8), float32 and
    bfloat16 rows: 1 and 2 rows in registers, 3..48 a chunk through the L1 buffer, more in
    several chunks (101), against float64 over the same weights."""
    if cpu_isa_level == "none":
        assert not cpu_ops.avx2_linear_available(torch.float32)
        pytest.skip("cpu_gemm.c's kernels start at the AVX2 level")
    torch.manual_seed(1)
    w = torch.randn(*shape) * 0.05
    b = torch.randn(shape[0])
    wb = w.to(torch.bfloat16)
    q4, q8 = quantize_int4(w), _int8(w)
    layouts = [
        (cpu_ops.W_PAIR_BF16, pack_pairs(wb), wb.float()),
        (cpu_ops.W_INT4, pack_int4(q4), q4.dequantize()),
        (cpu_ops.W_INT8, pack_int8(q8), q8.dequantize()),
    ]
    for rows in (1, 2, 3, 5, 48, 101):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, shape[1]).to(dtype)
            for kind, packed, dense in layouts:
                got = cpu_ops.linear_avx2(x, packed, kind, b.to(dtype), shape[0]).double()
                expect = x.double() @ dense.double().t() + b.to(dtype).double()
                tol = 1e-5 if dtype == torch.float32 else 2**-7
                assert (got - expect).abs().max() <= tol * expect.abs().max(), (kind, rows)


def test_bfloat16_linear_takes_the_avx2_kernel_where_onednn_has_none(cpu_isa_level):
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    layer = Linear(w)
    if can_prepack(w):
        assert layer.pairs is None and layer.packed  # oneDNN's bfloat16 (AVX-512 CPUs)
    else:
        assert (layer.pairs is not None) == (cpu_isa_level != "none")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert_within_an_ulp(layer(x), F.linear(x.float(), w.float()).to(torch.bfloat16))
