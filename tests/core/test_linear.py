"""Linear layers against plain torch: the oneDNN-prepacked path and weight-only int4."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from strata.model.linear import Int4Linear, Linear, can_prepack, quantize_int4


@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_prepacked_bfloat16_linear_equals_f_linear_bit_for_bit(rows):
    w = torch.randn(96, 64, dtype=torch.bfloat16)
    b = torch.randn(96, dtype=torch.bfloat16)
    if not can_prepack(w):
        pytest.skip("this CPU has no oneDNN bfloat16")
    layer = Linear(w, b)
    assert layer.packed and layer.weight.is_mkldnn
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, w, b))


def test_float32_linear_is_not_packed():
    w = torch.randn(8, 4)
    layer = Linear(w)
    assert not layer.packed
    x = torch.randn(3, 4)
    assert torch.equal(layer(x), F.linear(x, w))


def test_int4_linear_matches_its_dequantized_weight():
    torch.manual_seed(0)
    w = torch.randn(64, 128, dtype=torch.bfloat16)
    codes, sz = quantize_int4(w, 32)
    scale, zero = sz[..., 0].t(), sz[..., 1].t()  # [out, groups]
    deq = (codes.float().view(64, 4, 32) - 8) * scale[..., None] + zero[..., None]
    assert (deq.view(64, 128) - w.float()).abs().max() <= (w.float().abs().max() / 15)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    got = Int4Linear(w, None, torch.bfloat16)(x).float()
    expect = x.float() @ deq.view(64, 128).t()
    assert (got - expect).abs().max() <= 0.05 * expect.abs().max()
