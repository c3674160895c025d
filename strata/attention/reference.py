"""Torch reference ops for paged attention: the CPU path and the oracle for kernels.

Shapes: q [tokens, heads, head_dim]; k_pages / v_pages [pages, page_size, kv_heads, head_dim]
(one layer of the pool: a strided view whose pages are each contiguous); a token's slot is
page_id * page_size + offset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from strata.kv.pool import LayerKV, Segments


def split_slots(slots: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots [tokens] -> (page ids, offsets in the page), the index write_kv takes."""
    return torch.div(slots, page_size, rounding_mode="floor"), slots % page_size


def write_kv(
    layer: LayerKV, where: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor
) -> None:
    """Store k, v [tokens, kv_heads, head_dim] at (page ids, offsets) (see split_slots) and
    keep each written page's key summary (min and max per channel of the keys written to it
    since its offset 0). A page's tokens come in order."""
    pages, offsets = where
    layer.k.index_put_(where, k)
    layer.v.index_put_(where, v)
    first = offsets == 0
    layer.kmin.index_put_((pages[first],), k[first])
    layer.kmax.index_put_((pages[first],), k[first])
    index = pages[:, None, None].expand_as(k)
    layer.kmin.scatter_reduce_(0, index, k, "amin")
    layer.kmax.scatter_reduce_(0, index, k, "amax")


def gather_pages(pages: torch.Tensor, page_ids: torch.Tensor) -> torch.Tensor:
    """Whole pages of one layer: page_ids [n] -> [n * page_size, kv_heads, head_dim].

    NOTE: gathering pages, not slots, moves page_size times fewer (and larger) rows; on a
    2-D view index_select copies each row with one memcpy (5x faster than on the 4-D view).
    """
    return pages.flatten(1).index_select(0, page_ids).view(-1, *pages.shape[2:])


def softcap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(scores / cap): logits squashed into (-cap, cap) (Gemma 2); None: as given."""
    return scores if cap is None else torch.tanh(scores / cap) * cap


def decode_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    kv_head: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    cap: float | None = None,
) -> torch.Tensor:
    """Scaled float32 scores of a few query rows per batch entry over keys in the pool's own
    layout, with no copy of the keys.

    q [B, R, D]; k [B, L, kv_heads, D] (as gathered from pages); kv_head [R]: the KV head row
    r reads; mask [B, L] bool (True = attend) or None. Returns [B, R, L], -inf where masked.

    NOTE: every row is scored against all kv_heads (kv_heads x the FLOPs, still tiny for
    decode) so that the product is one batched GEMM on contiguous operands: on CPU this is
    4-8x faster than bfloat16 SDPA, whose flash kernel packs K for every single query. The
    GEMM rounds scores to the input dtype (as transformers' eager attention does); the
    softmax runs in float32.
    """
    b, l_len, kv_heads, d = k.shape
    r = q.shape[1]
    scores = torch.bmm(q, k.reshape(b, l_len * kv_heads, d).transpose(1, 2))
    pick = kv_head.view(1, r, 1, 1).expand(b, r, l_len, 1)
    s = softcap(scores.view(b, r, l_len, kv_heads).gather(3, pick).squeeze(3).float() * scale, cap)
    if mask is not None:
        s.masked_fill_(~mask[:, None, :], float("-inf"))
    return s


def decode_values(p: torch.Tensor, v: torch.Tensor, kv_head: torch.Tensor) -> torch.Tensor:
    """p [B, R, L] weights (float32) over v [B, L, kv_heads, D]: [B, R, D] in v's dtype."""
    b, l_len, kv_heads, d = v.shape
    r = p.shape[1]
    out = torch.bmm(p.to(v.dtype), v.reshape(b, l_len, kv_heads * d)).view(b, r, kv_heads, d)
    return out.gather(2, kv_head.view(1, r, 1, 1).expand(b, r, 1, d)).squeeze(2)


def _kv_heads_of(heads: int, kv_heads: int, device: torch.device) -> torch.Tensor:
    return torch.arange(heads, device=device) // (heads // kv_heads)


def paged_decode(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    kv_mask: torch.Tensor,
    scale: float,
    cap: float | None = None,
) -> torch.Tensor:
    """One query token per sequence over its pages (cap: the logits' soft cap).

    q [batch, heads, head_dim]; page_table [batch, max_pages] (padding may be any valid page);
    kv_mask [batch, max_pages * page_size] bool, True where the key belongs to the sequence.
    Returns [batch, heads, head_dim].
    """
    b = page_table.shape[0]
    flat = page_table.reshape(-1)
    k = gather_pages(k_pages, flat).view(b, -1, *k_pages.shape[2:])
    v = gather_pages(v_pages, flat).view(b, -1, *v_pages.shape[2:])
    kv_head = _kv_heads_of(q.shape[1], k_pages.shape[2], q.device)
    p = torch.softmax(decode_scores(q, k, kv_head, kv_mask, scale, cap), -1)
    return decode_values(p, v, kv_head)


def paged_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_ids: torch.Tensor,
    prefix_len: int,
    scale: float,
    cap: float | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Causal attention of q [q_len, heads, head_dim] at positions prefix_len.. over the
    sequence's keys: its cached prefix (in pages page_ids) followed by k, v [q_len, ...];
    cap: the logits' soft cap; window: each query sees only the last `window` positions,
    its own included (0: all)."""
    q_len = q.shape[0]
    qh = q.transpose(0, 1).unsqueeze(0)
    if cap is not None or window:
        return _masked_prefill(q, k, v, k_pages, v_pages, page_ids, prefix_len, scale, cap, window)
    if prefix_len == 0:  # nothing cached: attend over the new keys directly
        kh, vh = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True
        )
        return out.squeeze(0).transpose(0, 1)
    kv_len = prefix_len + q_len
    kh = gather_pages(k_pages, page_ids)[:kv_len].transpose(0, 1).unsqueeze(0)
    vh = gather_pages(v_pages, page_ids)[:kv_len].transpose(0, 1).unsqueeze(0)
    rows = torch.arange(prefix_len, kv_len, device=q.device)
    mask = torch.arange(kv_len, device=q.device)[None, :] <= rows[:, None]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


def window_mask(
    positions: torch.Tensor, kv_len: int, window: int = 0, first: int = 0
) -> torch.Tensor:
    """bool [len(positions), kv_len - first]: which of the keys first.. each query position
    sees (causal; with a window, only the last `window` positions, its own included)."""
    j = torch.arange(first, kv_len, device=positions.device)[None, :]
    seen = j <= positions[:, None]
    return seen & (j > positions[:, None] - window) if window else seen


def _masked_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_ids: torch.Tensor,
    prefix_len: int,
    scale: float,
    cap: float | None,
    window: int,
) -> torch.Tensor:
    """paged_prefill with soft-capped logits or a sliding window, in plain ops: float32
    scores, capped, masked, softmax, then the values. With a window, the cached pages wholly
    before the first query's window are not read."""
    q_len, heads, _ = q.shape
    kv_len, first = prefix_len + q_len, 0
    if prefix_len:
        ps = k_pages.shape[1]
        if window:  # the first page any query's window reaches
            first = max(0, prefix_len - window + 1) // ps * ps
        k = gather_pages(k_pages, page_ids[first // ps :])[: kv_len - first]
        v = gather_pages(v_pages, page_ids[first // ps :])[: kv_len - first]
    group = heads // k.shape[1]
    kh = k.transpose(0, 1).repeat_interleave(group, 0)  # [heads, L, D]
    vh = v.transpose(0, 1).repeat_interleave(group, 0)
    s = softcap(torch.bmm(q.transpose(0, 1), kh.transpose(1, 2)).float() * scale, cap)
    rows = torch.arange(prefix_len, kv_len, device=q.device)
    mask = window_mask(rows, kv_len, window, first)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return torch.bmm(p.to(v.dtype), vh).transpose(0, 1)


def paged_decode_cascade(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    shared_pages: torch.Tensor,
    suffix_table: torch.Tensor,
    suffix_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode for a batch whose sequences all start with the same pages (a shared prompt).

    The shared pages are read once and attended by every query as one matrix product; each
    sequence's own pages are attended separately; the two parts are merged by their
    log-sum-exp. q [batch, heads, head_dim]; shared_pages [P]; suffix_table [batch, S];
    suffix_mask [batch, S * page_size] bool, True where the key belongs to the sequence.
    """
    b, heads, d = q.shape
    kv_heads = k_pages.shape[2]
    kv_head = _kv_heads_of(heads, kv_heads, q.device)
    kp = gather_pages(k_pages, shared_pages).unsqueeze(0)
    vp = gather_pages(v_pages, shared_pages).unsqueeze(0)
    flat = suffix_table.reshape(-1)
    ks = gather_pages(k_pages, flat).view(b, -1, kv_heads, d)
    vs = gather_pages(v_pages, flat).view(b, -1, kv_heads, d)
    s_p = decode_scores(q.reshape(1, b * heads, d), kp, kv_head.repeat(b), None, scale)
    s_s = decode_scores(q, ks, kv_head, suffix_mask, scale)
    lse_p, lse_s = torch.logsumexp(s_p, -1), torch.logsumexp(s_s, -1)
    out_p = decode_values((s_p - lse_p[..., None]).exp_(), vp, kv_head.repeat(b)).view(b, heads, d)
    out_s = decode_values((s_s - lse_s[..., None]).exp_(), vs, kv_head)
    lse_p = lse_p.view(b, heads)
    lse = torch.logaddexp(lse_p, lse_s)
    out = (
        out_p.float() * (lse_p - lse).exp()[..., None]
        + out_s.float() * (lse_s - lse).exp()[..., None]
    )
    return out.to(q.dtype)


def segment_summaries(data: torch.Tensor, pages: torch.Tensor, ends: Sequence[int]) -> torch.Tensor:
    """Summaries of consecutive runs of pages ([0, ends[0]), [ends[0], ends[1]), ...) of a
    pool's data [pages, layers, 2, page_size + 1, kv_heads, D] (KVCache.data, whose row
    page_size holds each page's kmin in K and kmax in V): [S, layers, 2, kv_heads, D]."""
    ps = data.shape[3] - 1
    rows = data.index_select(0, pages[: ends[-1]])[:, :, :, ps]  # [n, layers, 2, kv, D]
    out = rows.new_empty(len(ends), *rows.shape[1:])
    start = 0
    for s, end in enumerate(ends):
        out[s, :, 0] = rows[start:end, :, 0].amin(0)
        out[s, :, 1] = rows[start:end, :, 1].amax(0)
        start = end
    return out


def spared_pages(
    u: torch.Tensor,
    q: torch.Tensor,
    forced: torch.Tensor,
    segments: Segments,
    layer: int,
    scale: float,
    min_score: float,
) -> torch.Tensor:
    """Pages select_pages need not score (bool [B, W, kv_heads]): those of a segment whose
    bound is, for every query head of the group, under min_score against the best bound
    among the forced pages. Such a page's own score is lower still (its keys lie inside the
    segment's min and max, and the best page is at least the best forced one), so skipping
    it changes no selection.

    u [B, W, kv_heads, g]: page bounds (-inf past a sequence's pages); q [B, kv_heads, g, D];
    forced [B, W] bool: the sink and window pages (and no padding)."""
    b, w = forced.shape
    sums = segments.sums[:, :, layer]  # [B, S, 2, kv_heads, D]
    ub = page_bounds(q, sums[:, :, 0], sums[:, :, 1])  # [B, S, kv_heads, g]
    best_forced = u.masked_fill(~forced[:, :, None, None], float("-inf")).amax(1)
    below = (scale * (ub - best_forced[:, None]) < min_score).all(-1)  # [B, S, kv_heads]
    pos = torch.arange(w, device=u.device)
    slot = torch.arange(segments.ends.shape[1], device=u.device)
    past = slot[None, :] >= segments.counts[:, None]
    ends = segments.ends.masked_fill(past, w)  # a row's unused entries end past its pages
    seg = (pos[None, :, None] >= ends[:, None, :]).sum(-1)  # [B, W]: p's segment
    inside = seg < segments.counts[:, None]
    seg = seg.clamp(max=max(segments.ends.shape[1] - 1, 0))
    hit = below.gather(1, seg[:, :, None].expand(b, w, below.shape[2]))
    return hit & (inside & ~forced)[:, :, None]


def page_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound of q.k over a page's keys: sum_d max(q_d * kmin_d, q_d * kmax_d).
    q [B, kv_heads, g, D]; kmin, kmax [B, P, kv_heads, D]. Returns [B, P, kv_heads, g]."""
    qq = q.float()[:, None]
    lo, hi = kmin.float()[:, :, :, None], kmax.float()[:, :, :, None]
    return torch.maximum(qq * lo, qq * hi).sum(-1)


def select_pages(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    active: torch.Tensor,
    page_size: int,
    scale: float,
    min_score: float,
    budget: float,
    sink: int,
    window: int,
    segments: Segments | None = None,
    layer: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pages each KV head of each decode sequence attends to (sparse decode).

    For a sequence of n pages and KV head h with query heads i of its group: u[p, i] is the
    bound of page p (page_bounds) and score[p] = max_i scale * (u[p, i] - max_p' u[p', i]),
    the log of the bound on the page's softmax weight relative to the best page's bound.
    Kept: the first `sink` and last `window` pages, and every other page whose score is at
    least min_score (SparseConfig.min_score); when `budget` (a page count if >= 1, a fraction
    of n if < 1; 0 for none) caps the kept pages, the other pages with the best scores fill
    it (an earlier page first on ties). A sequence not `active`, or of at most sink + window
    pages, keeps all. With `segments` (layer: the pool layer of kmin and kmax), the pages
    spared_pages rules out are set aside before ranking (the C kernel never scores them),
    which changes no selection.

    q [B, heads, D]; kmin, kmax [pages, kv_heads, D] (the pool's summaries); page_table
    [B, W]; seq_lens [B]; active [B] bool; budget, sink, window in pages. Returns (table
    [B, kv_heads, W]: the kept page ids in order, then padding; lens [B, kv_heads]: the kept
    pages' token count, the last page being the sequence's own partial one; kept [B,
    kv_heads]: the number of pages kept).
    """
    (b, heads, d), w, kv_heads = q.shape, page_table.shape[1], kmin.shape[1]
    g = heads // kv_heads
    n = -(-seq_lens // page_size)  # [B]
    flat = page_table.reshape(-1)
    lo = kmin.index_select(0, flat).view(b, w, kv_heads, d)
    hi = kmax.index_select(0, flat).view(b, w, kv_heads, d)
    u = page_bounds(q.view(b, kv_heads, g, d), lo, hi)  # [B, W, kv_heads, g]
    pos = torch.arange(w, device=q.device)[None, :]  # [1, W]
    valid = pos < n[:, None]
    u = u.masked_fill(~valid[:, :, None, None], float("-inf"))
    forced = (pos < sink) | (pos >= n[:, None] - window)
    if segments is not None:
        spared = spared_pages(
            u, q.view(b, kv_heads, g, d), forced & valid, segments, layer, scale, min_score
        )
        u = u.masked_fill(spared[..., None], float("-inf"))
    score = (scale * (u - u.amax(1, keepdim=True))).amax(-1)  # [B, W, kv_heads]
    everything = ~active | (n <= sink + window)
    cand = valid[:, :, None] & ~forced[:, :, None] & (score >= min_score)
    if budget > 0:
        cand &= _within_budget(score, cand, (forced & valid).sum(1), n, budget)
    keep = (forced & valid)[:, :, None] | cand
    keep |= (everything[:, None] & valid)[:, :, None]
    return _kept_table(page_table, keep, seq_lens, n, page_size)


def _kept_table(
    page_table: torch.Tensor, keep: torch.Tensor, seq_lens: torch.Tensor, n: torch.Tensor, ps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """select_pages' (table, lens, kept) from its choice keep [B, W, kv_heads]."""
    b, w, kv_heads = keep.shape
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # kept first
    table = page_table.gather(1, order.flatten(1)).view(b, w, kv_heads).transpose(1, 2)
    kept = keep.sum(1)  # [B, kv_heads]
    last = seq_lens - (n - 1) * ps
    lens = (kept - 1) * ps + last[:, None]
    return table.contiguous(), lens, kept


def _within_budget(
    score: torch.Tensor, cand: torch.Tensor, forced: torch.Tensor, n: torch.Tensor, budget: float
) -> torch.Tensor:
    """The candidates [B, W, kv_heads] that fit the budget beside the forced pages (forced
    [B]: their count): the best scores first, an earlier page first on ties."""
    cap = torch.ceil(budget * n).long() if budget < 1 else torch.full_like(n, int(budget))
    allowed = (cap - forced).clamp(min=0)  # [B]
    ranked = score.masked_fill(~cand, float("-inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    w = score.shape[1]
    rank.scatter_(1, order, torch.arange(w, device=score.device)[None, :, None].expand_as(order))
    return rank < allowed[:, None, None]


def kept_mask(page_table: torch.Tensor, table: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """uint8 [B, W]: 1 at the index (in page_table [B, W]) of each page that some KV head
    kept, from select_pages' table [B, kv_heads, W] and kept [B, kv_heads]."""
    w = table.shape[2]
    valid = torch.arange(w, device=table.device)[None, None, :] < kept[:, :, None]
    hit = (page_table[:, None, :, None] == table[:, :, None, :]) & valid[:, :, None, :]
    return hit.any(3).any(1).to(torch.uint8)


def paged_decode_selected(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    table: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode where each KV head reads its own pages: table [B, kv_heads, W], lens [B,
    kv_heads] (as select_pages returns). Returns [B, heads, D]."""
    b, heads, d = q.shape
    kv_heads = k_pages.shape[2]
    g = heads // kv_heads
    out = torch.empty_like(q)
    zero = torch.zeros(g, dtype=torch.int64, device=q.device)
    for h in range(kv_heads):
        flat = table[:, h].reshape(-1)
        k = k_pages.index_select(0, flat)[:, :, h : h + 1].reshape(b, -1, 1, d)
        v = v_pages.index_select(0, flat)[:, :, h : h + 1].reshape(b, -1, 1, d)
        mask = torch.arange(k.shape[1], device=q.device)[None, :] < lens[:, h, None]
        s = decode_scores(q[:, h * g : (h + 1) * g].contiguous(), k, zero, mask, scale)
        out[:, h * g : (h + 1) * g] = decode_values(torch.softmax(s, -1), v, zero)
    return out
