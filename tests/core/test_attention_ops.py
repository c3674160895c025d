"""Attention ops against each other and against a dense per-sequence oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from strata.attention import reference as ref

PS, KVH, G, D = 4, 2, 3, 16


def dense(q, k, v, scale):
    """One sequence: q [H, D] over k, v [L, KVH, D]."""
    kk = k.repeat_interleave(G, 1).transpose(0, 1)
    vv = v.repeat_interleave(G, 1).transpose(0, 1)
    return F.scaled_dot_product_attention(q[:, None], kk, vv, scale=scale).squeeze(1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_decode_ops_equal_dense_attention_per_sequence(dtype, tol):
    """Plain and cascade decode against dense float64 attention, per sequence; in bfloat16
    the scores are rounded to bfloat16 (as in transformers' eager attention)."""
    torch.manual_seed(0)
    slots = 64 * PS
    k_slots, v_slots = (
        torch.randn(slots, KVH, D, dtype=dtype),
        torch.randn(slots, KVH, D, dtype=dtype),
    )
    shared = [3, 9, 4]  # three pages every sequence starts with
    own = [[10, 11], [12], [20, 21, 22]]
    lens = [len(shared) * PS + n for n in (6, 1, 9)]
    b = len(own)
    q = torch.randn(b, KVH * G, D, dtype=dtype)
    tables = [shared + o for o in own]
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    scale = D**-0.5
    suffix = table[:, len(shared) :]
    pos = torch.arange(suffix.shape[1] * PS) + len(shared) * PS
    mask = pos[None, :] < torch.tensor(lens)[:, None]
    out = ref.paged_decode_cascade(
        q, k_slots, v_slots, torch.tensor(shared), suffix, mask, PS, scale
    )
    full_mask = torch.arange(width * PS)[None, :] < torch.tensor(lens)[:, None]
    plain = ref.paged_decode(q, k_slots, v_slots, table, full_mask, PS, scale)
    for i, t in enumerate(tables):
        idx = torch.tensor([p * PS + o for p in t for o in range(PS)])[: lens[i]]
        expect = dense(q[i].double(), k_slots[idx].double(), v_slots[idx].double(), scale)
        assert out.dtype == plain.dtype == dtype
        assert (out[i].double() - expect).abs().max() <= tol
        assert (plain[i].double() - expect).abs().max() <= tol
