"""Linear layers against plain torch: the oneDNN-prepacked path and weight-only int4."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from strata.attention.cpu_build import library
from strata.model import cpu_ops
from strata.model.linear import Int4Linear, Linear, _kernel_address, can_prepack, quantize_int4


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


@pytest.mark.parametrize("rows", [1, 4, 7, 40])  # strata's: AVX-512, AMX tiles, unpacked
@pytest.mark.parametrize("aten", [False, True])  # ATen's int4 product, where strata's can't run
def test_int4_linear_matches_its_dequantized_weight(rows, aten, monkeypatch):
    if aten:
        monkeypatch.setattr(cpu_ops, "int4_available", lambda: False)
    torch.manual_seed(0)
    w = torch.randn(64, 128, dtype=torch.bfloat16)
    b = torch.randn(64, dtype=torch.bfloat16)
    codes, sz = quantize_int4(w, 32)
    scale, zero = sz[..., 0].t(), sz[..., 1].t()  # [out, groups]
    deq = (codes.float().view(64, 4, 32) - 8) * scale[..., None] + zero[..., None]
    assert (deq.view(64, 128) - w.float()).abs().max() <= (w.float().abs().max() / 15)
    layer = Int4Linear(w, b, torch.bfloat16)
    if layer.strata == aten:
        pytest.skip("strata's int4 kernels need AVX512-BF16")
    sz = sz.to(torch.bfloat16)  # as every path reads them
    deq = (codes.float().view(64, 4, 32) - 8) * sz[..., 0].t().float()[..., None]
    deq = (deq + sz[..., 1].t().float()[..., None]).view(64, 128)
    x = torch.randn(rows, 128, dtype=torch.bfloat16)
    got = layer(x).float()
    expect = x.float() @ deq.t() + b.float()
    # a rounding of the output, or (unpacked, past 16 rows) of each weight to bfloat16
    assert (got - expect).abs().max() <= 2**-7 * expect.abs().max()
