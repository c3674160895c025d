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


def gather_pages(slots: torch.Tensor, page_ids: torch.Tensor, page_size: int) -> torch.Tensor:
    """Whole pages of one layer: page_ids [n] -> [n * page_size, kv_heads, head_dim].

    NOTE: gathering pages, not slots, moves page_size times fewer (and larger) rows.
    """
    pages = slots.view(-1, page_size, *slots.shape[1:])
    return pages.index_select(0, page_ids).view(-1, *slots.shape[1:])


def paged_decode(
    q: torch.Tensor,
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    page_table: torch.Tensor,
    kv_mask: torch.Tensor,
    page_size: int,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over its pages.

    q [batch, heads, head_dim]; page_table [batch, max_pages] (padding may be any valid page);
    kv_mask [batch, max_pages * page_size] bool, True where the key belongs to the sequence.
    Returns [batch, heads, head_dim].
    """
    b = page_table.shape[0]
    flat = page_table.reshape(-1)
    k = gather_pages(k_slots, flat, page_size).view(b, -1, *k_slots.shape[1:]).transpose(1, 2)
    v = gather_pages(v_slots, flat, page_size).view(b, -1, *v_slots.shape[1:]).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=kv_mask[:, None, None, :], scale=scale, enable_gqa=True
    )
    return out.squeeze(2)


def paged_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    page_ids: torch.Tensor,
    prefix_len: int,
    page_size: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of q [q_len, heads, head_dim] at positions prefix_len.. over the
    sequence's keys: its cached prefix (in pages page_ids) followed by k, v [q_len, ...]."""
    q_len = q.shape[0]
    qh = q.transpose(0, 1).unsqueeze(0)
    if prefix_len == 0:  # nothing cached: attend over the new keys directly
        kh, vh = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True
        )
        return out.squeeze(0).transpose(0, 1)
    kv_len = prefix_len + q_len
    kh = gather_pages(k_slots, page_ids, page_size)[:kv_len].transpose(0, 1).unsqueeze(0)
    vh = gather_pages(v_slots, page_ids, page_size)[:kv_len].transpose(0, 1).unsqueeze(0)
    rows = torch.arange(prefix_len, kv_len, device=q.device)
    mask = torch.arange(kv_len, device=q.device)[None, :] <= rows[:, None]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


def paged_decode_cascade(
    q: torch.Tensor,
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    shared_pages: torch.Tensor,
    suffix_table: torch.Tensor,
    suffix_bias: torch.Tensor,
    page_size: int,
    scale: float,
) -> torch.Tensor:
    """Decode for a batch whose sequences all start with the same pages (a shared prompt).

    The shared pages are read once and attended by every query as one matrix product; each
    sequence's own pages are attended separately; the two parts are merged by their
    log-sum-exp. q [batch, heads, head_dim]; shared_pages [P]; suffix_table [batch, S];
    suffix_bias [batch, 1, 1, S * page_size] additive (0 or -inf), in q's dtype.
    """
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    b, heads, d = q.shape
    kv_heads = k_slots.shape[1]
    g = heads // kv_heads
    q4 = q.reshape(b, kv_heads, g, d)  # query head h reads kv head h // g
    kp = gather_pages(k_slots, shared_pages, page_size).transpose(0, 1).unsqueeze(0)
    vp = gather_pages(v_slots, shared_pages, page_size).transpose(0, 1).unsqueeze(0)
    qp = q4.permute(1, 0, 2, 3).reshape(1, kv_heads, b * g, d)
    out_p, lse_p = flash(qp, kp, vp, scale=scale)
    out_p = out_p.reshape(kv_heads, b, g, d).permute(1, 0, 2, 3)
    lse_p = lse_p.reshape(kv_heads, b, g).permute(1, 0, 2)
    flat = suffix_table.reshape(-1)
    ks = gather_pages(k_slots, flat, page_size).view(b, -1, kv_heads, d).transpose(1, 2)
    vs = gather_pages(v_slots, flat, page_size).view(b, -1, kv_heads, d).transpose(1, 2)
    out_s, lse_s = flash(q4, ks, vs, attn_mask=suffix_bias, scale=scale)
    lse = torch.logaddexp(lse_p, lse_s)
    out = (
        out_p.float() * (lse_p - lse).exp()[..., None]
        + out_s.float() * (lse_s - lse).exp()[..., None]
    )
    return out.to(q.dtype).reshape(b, heads, d)
