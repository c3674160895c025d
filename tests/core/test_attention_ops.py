"""Attention ops against each other and against a dense per-sequence oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strata.attention import reference as ref

PS, KVH, G, D = 4, 2, 3, 16


def dense(q, k, v, scale):
    """One sequence: q [H, D] over k, v [L, KVH, D]."""
    kk = k.repeat_interleave(G, 1).transpose(0, 1)
    vv = v.repeat_interleave(G, 1).transpose(0, 1)
    return F.scaled_dot_product_attention(q[:, None], kk, vv, scale=scale).squeeze(1)


def test_cascade_decode_equals_dense_attention_per_sequence():
    torch.manual_seed(0)
    slots = 64 * PS
    k_slots, v_slots = torch.randn(slots, KVH, D), torch.randn(slots, KVH, D)
    shared = [3, 9, 4]  # three pages every sequence starts with
    own = [[10, 11], [12], [20, 21, 22]]
    lens = [len(shared) * PS + n for n in (6, 1, 9)]
    b = len(own)
    q = torch.randn(b, KVH * G, D)
    tables = [shared + o for o in own]
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    scale = D**-0.5
    suffix = table[:, len(shared) :]
    pos = torch.arange(suffix.shape[1] * PS) + len(shared) * PS
    mask = pos[None, :] < torch.tensor(lens)[:, None]
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))[:, None, None]
    out = ref.paged_decode_cascade(
        q, k_slots, v_slots, torch.tensor(shared), suffix, bias, PS, scale
    )
    full_mask = torch.arange(width * PS)[None, :] < torch.tensor(lens)[:, None]
    plain = ref.paged_decode(q, k_slots, v_slots, table, full_mask, PS, scale)
    for i, t in enumerate(tables):
        idx = torch.tensor([p * PS + o for p in t for o in range(PS)])[: lens[i]]
        expect = dense(q[i], k_slots[idx], v_slots[idx], scale)
        assert (out[i] - expect).abs().max() <= 1e-5
        assert (plain[i] - expect).abs().max() <= 1e-5
