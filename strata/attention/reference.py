"""Torch reference ops for paged attention: the CPU path and the oracle for kernels.

Shapes: q [tokens, heads, head_dim]; k_slots / v_slots [pages * page_size, kv_heads,
head_dim] (one layer of the pool); a slot is page_id * page_size + offset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Store k, v [tokens, kv_heads, head_dim] at slots [tokens]."""
    k_slots.index_copy_(0, slots, k)
    v_slots.index_copy_(0, slots, v)


def paged_decode(
    q: torch.Tensor,
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    kv_index: torch.Tensor,
    kv_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over its pages.

    q [batch, heads, head_dim]; kv_index [batch, max_kv] slots (padding may be any valid slot);
    kv_mask [batch, max_kv] bool, True where the key belongs to the sequence.
    Returns [batch, heads, head_dim].
    """
    b, max_kv = kv_index.shape
    flat = kv_index.reshape(-1)
    k = k_slots.index_select(0, flat).view(b, max_kv, *k_slots.shape[1:]).transpose(1, 2)
    v = v_slots.index_select(0, flat).view(b, max_kv, *v_slots.shape[1:]).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=kv_mask[:, None, None, :], scale=scale, enable_gqa=True
    )
    return out.squeeze(2)


def paged_prefill(
    q: torch.Tensor,
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    kv_index: torch.Tensor,
    prefix_len: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of q [q_len, heads, head_dim] at positions prefix_len.. over the keys
    at kv_index [prefix_len + q_len] (the cached prefix followed by the new tokens)."""
    q_len, kv_len = q.shape[0], kv_index.shape[0]
    k = k_slots.index_select(0, kv_index).transpose(0, 1).unsqueeze(0)
    v = v_slots.index_select(0, kv_index).transpose(0, 1).unsqueeze(0)
    qh = q.transpose(0, 1).unsqueeze(0)
    if prefix_len == 0:
        out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        rows = torch.arange(prefix_len, prefix_len + q_len, device=q.device)
        mask = torch.arange(kv_len, device=q.device)[None, :] <= rows[:, None]
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)
