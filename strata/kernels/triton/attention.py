"""Triton kernels for paged attention on GPUs: KV write with the page summaries, paged decode
(dense, or over each KV head's selected pages) and prefill over a cached prefix.

They read the pool in place through its strides (a layer's K is a strided view [pages,
page_size, kv_heads, head_dim] of the page-major pool) and address keys token by token
(token j of a sequence is offset j % page_size of page table[j // page_size]), so a block
of keys may span pages of any size. The torch ops in reference.py are their oracle.

Import this module only where Triton can run: on CUDA, or on CPU tensors when the process
started with TRITON_INTERPRET=1 (the tests do; the interpreter has no bfloat16, so they use
float32 and float16). Triton reads that variable when a kernel is defined, at import.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.kv.pool import LayerKV


def _pow2(n: int, least: int = 1) -> int:
    return max(least, triton.next_power_of_2(n))


@triton.jit
def _write_kv_kernel(
    K,
    V,
    KPool,
    VPool,
    KMin,
    KMax,
    Pages,
    Offsets,
    num_tokens,
    s_kt,
    s_kh,
    s_vt,
    s_vh,
    s_pp,
    s_pt,
    s_ph,
    s_sp,
    s_sh,
    D: tl.constexpr,
    DP: tl.constexpr,
    PS: tl.constexpr,
    PSP: tl.constexpr,
):
    """Program (token t, KV head h): store t's key and value in its slot. The first token of
    each run of consecutive tokens in one page also folds the run's keys into the page's
    summary (min and max per channel), starting afresh when the run starts at offset 0."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, DP)
    dm = d < D
    page = tl.load(Pages + t)
    off = tl.load(Offsets + t)
    key = tl.load(K + t * s_kt + h * s_kh + d, mask=dm)
    val = tl.load(V + t * s_vt + h * s_vh + d, mask=dm)
    slot = page * s_pp + off * s_pt + h * s_ph + d
    tl.store(KPool + slot, key, mask=dm)
    tl.store(VPool + slot, val, mask=dm)
    prev = tl.load(Pages + t - 1, mask=t > 0, other=-1)
    if prev != page:  # t heads a run: it and the next tokens while they fill the same page
        rows = t + tl.arange(0, PSP)
        in_run = rows < num_tokens
        in_run &= tl.load(Pages + rows, mask=in_run, other=-1) == page
        in_run &= tl.arange(0, PSP) < PS - off
        both = in_run[:, None] & dm[None, :]
        keys = tl.load(K + rows[:, None] * s_kt + h * s_kh + d[None, :], mask=both)
        keys = keys.to(tl.float32)
        lo = tl.min(tl.where(both, keys, float("inf")), axis=0)
        hi = tl.max(tl.where(both, keys, float("-inf")), axis=0)
        at = page * s_sp + h * s_sh + d
        if off > 0:
            lo = tl.minimum(lo, tl.load(KMin + at, mask=dm).to(tl.float32))
            hi = tl.maximum(hi, tl.load(KMax + at, mask=dm).to(tl.float32))
        tl.store(KMin + at, lo.to(KMin.dtype.element_ty), mask=dm)
        tl.store(KMax + at, hi.to(KMax.dtype.element_ty), mask=dm)


def write_kv(
    layer: LayerKV, where: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor
) -> None:
    """reference.write_kv: k, v [tokens, kv_heads, head_dim] into their slots (page ids,
    offsets), and the written pages' key summaries. A page's tokens come in order and
    adjacent in the batch (as a forward batch lays them out)."""
    pages, offsets = where
    t, kv_heads, d = k.shape
    if t == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "a key's channels must be adjacent"
    ps = layer.k.shape[1]
    _write_kv_kernel[(t, kv_heads)](
        k,
        v,
        layer.k,
        layer.v,
        layer.kmin,
        layer.kmax,
        pages,
        offsets,
        t,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        *layer.k.stride()[:3],
        *layer.kmin.stride()[:2],
        D=d,
        DP=_pow2(d),
        PS=ps,
        PSP=_pow2(ps),
    )


@triton.jit
def _soft_cap(s, cap):
    """cap * tanh(s / cap), tanh from one exp (1 - 2 / (e^2x + 1): +-1 where it overflows)."""
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * s / cap) + 1.0))


@triton.jit
def _logits(q, key, scale, cap, CAP: tl.constexpr, IEEE: tl.constexpr):
    """q key^T times the scale ([rows, keys]), soft-capped where CAP."""
    if IEEE:
        s = tl.dot(q, tl.trans(key), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(key))
    s = s * scale
    if CAP:
        s = _soft_cap(s, cap)
    return s


@triton.jit
def _decode_kernel(
    Q, K, V, Out, PartOut, PartLse, Table, Lens,
    s_qb, s_qh, s_ob, s_oh, s_kp, s_kt, s_kh, s_tb, s_th, s_lb, s_lh,
    scale, chunk, cap, window,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, PS: tl.constexpr,
    BN: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr, CAP: tl.constexpr,
):  # fmt: skip
    """Program (sequence b, KV head h, split s): the G query heads of h over tokens s *
    chunk .. (s + 1) * chunk of the Lens[b, h] tokens of the pages Table[b, h, :] lists, BN
    keys at a time, with an online softmax. The group's heads, padded to GP >= 16 rows, meet
    the keys in matrix products (tensor cores on a GPU). One split writes Out; several
    (SPLIT) write their normalized part and its log-sum-exp for _combine_kernel. CAP: the
    scaled logits go through cap * tanh(s / cap); window > 0: only the last `window` keys
    are read."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s_id = tl.program_id(2)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    gm = g < G
    dm = d < D
    heads = h * G + g
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=gm[:, None] & dm[None, :])
    n = tl.load(Lens + b * s_lb + h * s_lh)
    first = s_id * chunk
    last = tl.minimum(n, first + chunk)
    if window > 0:
        first = tl.maximum(first, n - window)
    m = tl.full([GP], float("-inf"), tl.float32)
    total = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    for start in range(first, last, BN):
        j = start + tl.arange(0, BN)
        jm = j < last
        page = tl.load(Table + b * s_tb + h * s_th + j // PS, mask=jm, other=0).to(tl.int64)
        at = page[:, None] * s_kp + (j % PS)[:, None] * s_kt + h * s_kh + d[None, :]
        both = jm[:, None] & dm[None, :]
        key = tl.load(K + at, mask=both, other=0.0)  # [BN, DP]
        val = tl.load(V + at, mask=both, other=0.0)
        s = tl.where(jm[None, :], _logits(q, key, scale, cap, CAP, IEEE), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p, val, input_precision="ieee")
        else:
            pv = tl.dot(p.to(val.dtype), val)
        acc = acc * alpha[:, None] + pv
        m = m_new
    out = acc / tl.maximum(total, 1e-30)[:, None]  # an empty split: zeros, weighed 0 below
    mask = gm[:, None] & dm[None, :]
    if SPLIT:
        nsplit = tl.num_programs(2)
        row = (b * tl.num_programs(1) * G + heads) * nsplit + s_id  # [B, heads, splits]
        tl.store(PartOut + row[:, None] * DP + d[None, :], out, mask=mask)
        tl.store(PartLse + row, m + tl.log(tl.maximum(total, 1e-30)), mask=gm)
    else:
        o_at = Out + b * s_ob + heads[:, None] * s_oh + d[None, :]
        tl.store(o_at, out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(
    Out,
    PartOut,
    PartLse,
    s_qb,
    s_qh,
    heads,
    S: tl.constexpr,
    SP: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
):
    """Program (sequence b, query head): its S splits' parts, each weighed by its share of
    the softmax's sum (exp of its log-sum-exp; an empty split's is -inf, so 0)."""
    b = tl.program_id(0)
    hq = tl.program_id(1)
    sp = tl.arange(0, SP)
    d = tl.arange(0, DP)
    row = (b * heads + hq) * S + sp
    lse = tl.load(PartLse + row, mask=sp < S, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, axis=0))
    part = tl.load(PartOut + row[:, None] * DP + d[None, :], mask=(sp < S)[:, None], other=0.0)
    out = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
    tl.store(Out + b * s_qb + hq * s_qh + d, out.to(Out.dtype.element_ty), mask=d < D)


# NOTE: keys a decode program reads at a time on a GPU (any size: keys are addressed one by
# one, so a block may span pages). bench/gpu_check.py's sweep on an H200, ms for blocks of
# 16/32/64/128 at 4096 tokens: 9/3x64 heads batch 1 .097/.083/.082/.049, batch 32
# .114/.076/.057/.047 (SDPA over contiguous K/V: .046); 32/8x128 batch 8 .090/.066/.053/.056
DECODE_BLOCK = 128
# NOTE: a split reads at least this many keys: fewer, and combining costs more than it saves.
MIN_SPLIT_TOKENS = 256


def decode_splits(programs: int, max_len: int, device: torch.device) -> int:
    """How many parts each sequence's keys are cut into (flash-decoding): enough programs to
    fill the GPU twice over when the batch alone does not, MIN_SPLIT_TOKENS keys at least a
    part. A function of the shapes only, so a captured graph's split holds for any lens."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-2 * sms // max(1, programs))
    return max(1, min(want, max_len // MIN_SPLIT_TOKENS))


def _decode(
    q: torch.Tensor,
    layer: LayerKV,
    table: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    per_head: bool,
    splits: int | None = None,
    block: int | None = None,
    cap: float | None = None,
    window: int = 0,
) -> torch.Tensor:
    b, heads, d = q.shape
    kv_heads = layer.k.shape[2]
    g = heads // kv_heads
    assert q.stride(-1) == 1, "a query's channels must be adjacent"
    out = torch.empty(b, heads, d, dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    s_tb, s_th = (table.stride(0), table.stride(1)) if per_head else (table.stride(0), 0)
    s_lb, s_lh = (lens.stride(0), lens.stride(1)) if per_head else (lens.stride(0), 0)
    assert table.stride(-1) == 1, "a page table's rows must be contiguous"
    ps = layer.k.shape[1]
    bn = block or (DECODE_BLOCK if q.device.type == "cuda" else _pow2(ps, 16))
    max_len = table.shape[-1] * ps  # what the table can address: no lens read on the host
    if splits is None:
        splits = decode_splits(b * kv_heads, max_len, q.device)
    chunk = -(-max_len // splits // bn) * bn  # whole blocks of keys
    dp = _pow2(d, 16)
    part_out = part_lse = out  # unused with one split
    if splits > 1:
        part_out = torch.empty(b * heads * splits, dp, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(b * heads * splits, dtype=torch.float32, device=q.device)
    _decode_kernel[(b, kv_heads, splits)](
        q, layer.k, layer.v, out, part_out, part_lse, table, lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *layer.k.stride()[:3],
        s_tb, s_th, s_lb, s_lh,
        scale, chunk, cap or 1.0, window,
        G=g, GP=_pow2(g, 16), D=d, DP=dp, PS=ps, BN=bn, SPLIT=splits > 1,
        IEEE=q.dtype == torch.float32, CAP=cap is not None,
    )  # fmt: skip
    if splits > 1:
        _combine_kernel[(b, heads)](
            out,
            part_out,
            part_lse,
            out.stride(0),
            out.stride(1),
            heads,
            S=splits,
            SP=_pow2(splits),
            D=d,
            DP=dp,
        )
    return out


def paged_decode(
    q: torch.Tensor,
    layer: LayerKV,
    page_table: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    splits: int | None = None,
    block: int | None = None,
    cap: float | None = None,
    window: int = 0,
) -> torch.Tensor:
    """reference.paged_decode: q [B, heads, D], page_table [B, max_pages], lens [B] tokens.
    splits: parts each sequence's keys are cut into (default: decode_splits); block: keys
    a program reads at a time (default: DECODE_BLOCK on a GPU); cap: the logits' tanh soft
    cap; window: each sequence's last `window` keys only (0: all), the others unread."""
    return _decode(q, layer, page_table, lens, scale, False, splits, block, cap, window)


def paged_decode_selected(
    q: torch.Tensor,
    layer: LayerKV,
    table: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    splits: int | None = None,
) -> torch.Tensor:
    """reference.paged_decode_selected: each KV head reads its own pages, table [B,
    kv_heads, W] and lens [B, kv_heads] as reference.select_pages returns them."""
    return _decode(q, layer, table, lens, scale, True, splits)


@triton.jit
def _prefill_kernel(
    Q, K, V, Out, Table, Starts, QLens, Prefix,
    s_qt, s_qh, s_kp, s_kt, s_kh, s_tb,
    scale, cap, window,
    G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, PS: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, IEEE: tl.constexpr, CAP: tl.constexpr,
):  # fmt: skip
    """Program (sequence e, block of BM queries, query head h): causal attention of those
    queries (at positions Prefix[e] + row) over the sequence's keys, all already in its
    pages Table[e, :], BN keys at a time. CAP: soft-capped logits (as _decode_kernel);
    window > 0: a query sees its last `window` positions, its own included, and the keys
    before the block's first window are not read."""
    e = tl.program_id(0)
    blk = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // G
    q_len = tl.load(QLens + e)
    if blk * BM < q_len:
        start = tl.load(Starts + e)
        prefix = tl.load(Prefix + e)
        r = blk * BM + tl.arange(0, BM)
        rm = r < q_len
        d = tl.arange(0, DP)
        dm = d < D
        q_at = (start + r)[:, None] * s_qt + h * s_qh + d[None, :]
        q = tl.load(Q + q_at, mask=rm[:, None] & dm[None, :], other=0.0)
        pos = prefix + r  # each query's own position: it sees keys 0..pos
        m = tl.full([BM], float("-inf"), tl.float32)
        total = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, DP], tl.float32)
        end = prefix + tl.minimum((blk + 1) * BM, q_len)
        begin = 0
        if window > 0:
            begin = tl.maximum(0, prefix + blk * BM - window + 1)
        for kstart in range(begin, end, BN):
            j = kstart + tl.arange(0, BN)
            jm = j < end
            page = tl.load(Table + e * s_tb + j // PS, mask=jm, other=0).to(tl.int64)
            at = page[:, None] * s_kp + (j % PS)[:, None] * s_kt + kvh * s_kh + d[None, :]
            both = jm[:, None] & dm[None, :]
            key = tl.load(K + at, mask=both, other=0.0)
            val = tl.load(V + at, mask=both, other=0.0)
            s = _logits(q, key, scale, cap, CAP, IEEE)  # [BM, BN]
            seen = (j[None, :] <= pos[:, None]) & jm[None, :]
            if window > 0:
                seen = seen & (j[None, :] > pos[:, None] - window)
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            total = total * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p, val.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(val.dtype), val)
            acc = acc * alpha[:, None] + pv
            m = m_new
        out = acc / total[:, None]
        tl.store(Out + q_at, out.to(Out.dtype.element_ty), mask=rm[:, None] & dm[None, :])


# NOTE: (queries, keys) a prefill program takes at a time on a GPU. bench/gpu_check.py's
# sweep on an H200, 2048 new tokens: 64x64 .081 ms (9/3x64) and .236 (32/8x128), against
# .198 and .708 for 16x16; 32x32, 64x32, 128x32 and 128x64 in between
PREFILL_BLOCKS = (64, 64)


def paged_prefill(
    q: torch.Tensor,
    layer: LayerKV,
    table: torch.Tensor,
    starts: torch.Tensor,
    q_lens: torch.Tensor,
    prefix_lens: torch.Tensor,
    max_q_len: int,
    scale: float,
    blocks: tuple[int, int] | None = None,
    cap: float | None = None,
    window: int = 0,
) -> torch.Tensor:
    """reference.paged_prefill for every prefilling sequence of a batch at once, after their
    new keys are written to their pages. q [T, heads, D] (rows of sequence e: starts[e] ..
    starts[e] + q_lens[e]); table [E, max_pages]: each sequence's pages; prefix_lens [E]:
    its tokens cached before these. Rows of no sequence are left as they are in the result.
    blocks: (queries, keys) a program takes at a time (default: PREFILL_BLOCKS on a GPU);
    cap: the logits' tanh soft cap; window: each query's last `window` positions only."""
    t, heads, d = q.shape
    kv_heads = layer.k.shape[2]
    q = q.contiguous()
    out = torch.empty_like(q)
    e = table.shape[0]
    if e == 0:
        return out
    ps = layer.k.shape[1]
    bm, bn = blocks or (PREFILL_BLOCKS if q.device.type == "cuda" else (16, _pow2(ps, 16)))
    grid = (e, triton.cdiv(max_q_len, bm), heads)
    _prefill_kernel[grid](
        q,
        layer.k,
        layer.v,
        out,
        table,
        starts,
        q_lens,
        prefix_lens,
        q.stride(0),
        q.stride(1),
        *layer.k.stride()[:3],
        table.stride(0),
        scale,
        cap or 1.0,
        window,
        G=heads // kv_heads,
        D=d,
        DP=_pow2(d, 16),
        PS=ps,
        BM=bm,
        BN=bn,
        IEEE=q.dtype == torch.float32,
        CAP=cap is not None,
    )
    return out
