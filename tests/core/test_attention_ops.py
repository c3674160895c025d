"""Attention ops against each other and against a dense per-sequence oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from strata.attention import reference as ref
from strata.kernels.cpu import attention as cpu_kernels
from strata.kernels.cpu import ops as cpu_ops
from strata.kv.pool import KVCache

PS, KVH, G, D = 4, 2, 3, 16


def pool_kv(pages, page_size, kv_heads, dim, dtype):
    """One layer (LayerKV) of a random three-layer pool: strided pages, as the engine's."""
    kv = KVCache(3, pages, page_size, kv_heads, dim, dtype, "cpu")
    kv.data.copy_(torch.randn(kv.data.shape))
    return kv.layers[1]


def pool_layer(pages, page_size, kv_heads, dim, dtype):
    """One layer's (K, V) page views of a random three-layer pool."""
    return pool_kv(pages, page_size, kv_heads, dim, dtype)[:2]


def tokens(pages, table_row, n):
    """The first n tokens' rows [n, kv_heads, dim] of the sequence whose pages are table_row."""
    return pages[torch.as_tensor(table_row)].flatten(0, 1)[:n]


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
    k_pages, v_pages = pool_layer(64, PS, KVH, D, dtype)
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
    out = ref.paged_decode_cascade(q, k_pages, v_pages, torch.tensor(shared), suffix, mask, scale)
    full_mask = torch.arange(width * PS)[None, :] < torch.tensor(lens)[:, None]
    plain = ref.paged_decode(q, k_pages, v_pages, table, full_mask, scale)
    for i, t in enumerate(tables):
        k, v = tokens(k_pages, t, lens[i]).double(), tokens(v_pages, t, lens[i]).double()
        expect = dense(q[i].double(), k, v, scale)
        assert out.dtype == plain.dtype == dtype
        assert (out[i].double() - expect).abs().max() <= tol
        assert (plain[i].double() - expect).abs().max() <= tol


def test_cpu_kernel_builds():
    """The C compiler is part of the set-up (as on CI): without it every test below would
    quietly compare the reference with itself."""
    assert cpu_kernels.library() is not None


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(
    "heads,kv_heads,dim,page,lens",
    [
        (4, 2, 16, 4, [1, 5, 13]),  # generic head_dim, a 1-token sequence
        (9, 3, 64, 16, [300]),  # one long sequence: split over the threads
        (8, 8, 128, 16, [17, 64, 3, 250]),  # no grouping, head_dim 128
        (6, 2, 64, 8, [40] * 9),
        (8, 2, 64, 16, [33, 7]),  # 4 query heads per KV head: blocks of 3 and 1 (AVX-512)
        (16, 2, 128, 16, [70, 16]),  # 8 per KV head at head_dim 128: blocks of 2
    ],
)
def test_cpu_decode_kernel_equals_dense_attention(
    heads, kv_heads, dim, page, lens, dtype, tol, cpu_isa_level
):
    torch.manual_seed(len(lens) + dim)
    pages = 200
    k_pages, v_pages = pool_layer(pages, page, kv_heads, dim, dtype)
    width = max(-(-n // page) for n in lens) + 1  # one unused column of padding
    perm = torch.randperm(pages)
    table = perm[: len(lens) * width].view(len(lens), width)
    q = torch.randn(len(lens), heads, dim).to(dtype)
    scale = dim**-0.5
    out = cpu_kernels.paged_decode(q, k_pages, v_pages, table, torch.tensor(lens), scale)
    assert out is not None and out.dtype == dtype and out.shape == q.shape
    g = heads // kv_heads
    for i, n in enumerate(lens):
        kk = tokens(k_pages, table[i], n).double().repeat_interleave(g, 1).transpose(0, 1)
        vv = tokens(v_pages, table[i], n).double().repeat_interleave(g, 1).transpose(0, 1)
        expect = F.scaled_dot_product_attention(q[i].double()[:, None], kk, vv, scale=scale)
        assert (out[i].double() - expect.squeeze(1)).abs().max() <= tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(
    "cap,window,lens",
    [
        (5.0, 0, [1, 37, 300]),  # Gemma 2's soft cap (small: it bites), whole contexts
        (None, 20, [5, 20, 21, 37, 300]),  # windows shorter, equal and longer; mid-page starts
        (5.0, 32, [33, 200]),  # both; a window starting on a page boundary
    ],
)
def test_cpu_decode_with_a_soft_cap_and_a_window(cap, window, lens, dtype, tol, cpu_isa_level):
    """The kernel caps the scaled logits (cap * tanh(s / cap)) and sees each sequence's last
    `window` keys only; the pages wholly before a window are not read (they hold NaN)."""
    torch.manual_seed(len(lens))
    heads, kv_heads, dim, page = 8, 2, 64, 16
    k_pages, v_pages = pool_layer(128, page, kv_heads, dim, dtype)
    width = max(-(-n // page) for n in lens)
    table = torch.randperm(128)[: len(lens) * width].view(len(lens), width)
    for i, n in enumerate(lens):
        if window and n > window:
            unread = table[i, : (n - window) // page]
            k_pages[unread], v_pages[unread] = float("nan"), float("nan")
    q = (3 * torch.randn(len(lens), heads, dim)).to(dtype)  # large logits: the cap matters
    scale = dim**-0.5
    out = cpu_kernels.paged_decode(
        q, k_pages, v_pages, table, torch.tensor(lens), scale, cap=cap, window=window
    )
    assert out is not None and out.dtype == dtype
    g = heads // kv_heads
    for i, n in enumerate(lens):
        lo = max(0, n - window) if window else 0
        kk = tokens(k_pages, table[i], n)[lo:].double().repeat_interleave(g, 1).transpose(0, 1)
        vv = tokens(v_pages, table[i], n)[lo:].double().repeat_interleave(g, 1).transpose(0, 1)
        s = torch.einsum("hd,hld->hl", q[i].double(), kk) * scale
        s = cap * torch.tanh(s / cap) if cap else s
        expect = torch.einsum("hl,hld->hd", s.softmax(-1), vv)
        assert (out[i].double() - expect).abs().max() <= tol, i


@pytest.mark.parametrize(
    "batch,shared,own",
    [
        (4, 4, [1, 16, 17, 40]),  # one chunk of 4 pages; an own page just begun, one full
        (16, 5, [7] * 16),  # an odd last page (its half of the V tile is zeros)
        (40, 9, [3, 30] * 20),  # two parts of 5 and 4 pages; 120 queries: 8 blocks of 16
        (5, 6, [1, 2, 3, 4, 5]),  # 15 queries: one block, a padding row
    ],
)
def test_cpu_decode_reads_a_shared_prefix_once(batch, shared, own, cpu_isa_level):
    """Sequences that start with the same pages (a shared prompt): the kernel reads those
    once for every query of a KV head (AMX tiles, else AVX2) and merges them with each
    sequence's own pages; the same attention as dense, per sequence."""
    torch.manual_seed(batch)
    heads, kv_heads, dim, page = 9, 3, 64, 16
    k_pages, v_pages = pool_layer(300, page, kv_heads, dim, torch.bfloat16)
    perm = torch.randperm(300).tolist()
    rows, at = [], shared
    lens = [shared * page + n for n in own]
    for n in lens:
        mine = -(-n // page) - shared
        rows.append(perm[:shared] + perm[at : at + mine])
        at += mine
    width = max(len(r) for r in rows)
    table = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    q = torch.randn(batch, heads, dim).to(torch.bfloat16)
    scale, lens_t = dim**-0.5, torch.tensor(lens)
    assert cpu_kernels.shared_pages(table, lens_t, page) == shared
    out = cpu_kernels.paged_decode(q, k_pages, v_pages, table, lens_t, scale, shared=shared)
    assert out is not None
    for i, n in enumerate(lens):
        kk = tokens(k_pages, table[i], n).double().repeat_interleave(3, 1).transpose(0, 1)
        vv = tokens(v_pages, table[i], n).double().repeat_interleave(3, 1).transpose(0, 1)
        expect = F.scaled_dot_product_attention(q[i].double()[:, None], kk, vv, scale=scale)
        assert (out[i].double() - expect.squeeze(1)).abs().max() <= 1e-2
    assert cpu_kernels.shared_decode_available() == (cpu_isa_level != "none")
    if cpu_kernels.shared_decode_available():
        # read once, from the first row: the other rows' copies of those columns (here a
        # page of NaN) are never read
        spare = perm[-1]
        assert spare not in table.tolist()[0] and at < len(perm) - 1
        k_pages[spare], v_pages[spare] = float("nan"), float("nan")
        poisoned = table.clone()
        poisoned[1:, :shared] = spare
        again = cpu_kernels.paged_decode(
            q, k_pages, v_pages, poisoned, lens_t, scale, shared=shared
        )
        assert again is not None and torch.equal(again, out)


@pytest.mark.parametrize(
    "prefixes,q_lens",
    [
        ([0], [5]),  # a fresh prompt shorter than a page
        ([0, 37, 160], [50, 3, 130]),  # a partial first page; blocks of 42 tokens; 3 tiles
        ([16, 400], [16, 33]),  # whole pages before; the last chunk of 4 pages part-read
    ],
)
@pytest.mark.parametrize(
    "dtype,dim", [(torch.bfloat16, 64), (torch.float32, 64), (torch.bfloat16, 128)]
)
def test_cpu_prefill_reads_pages_in_place(prefixes, q_lens, dtype, dim, cpu_isa_level):
    """Prefill over a cached prefix (AMX tiles, else AVX2): every prefilling sequence of a
    forward in one call, its new K and V already in its pages, queries read strided from
    the fused projection; the same causal attention as dense, per sequence, and what lies
    in a last page past the sequence (NaN here) is never read."""
    torch.manual_seed(len(q_lens))
    heads, kv_heads, page = 9, 3, 16
    layer = pool_kv(300, page, kv_heads, dim, dtype)
    k_pages, v_pages = layer.k, layer.v
    perm, at, rows = torch.randperm(300).tolist(), 0, []
    for p, n in zip(prefixes, q_lens):
        used = -(-(p + n) // page)
        rows.append(perm[at : at + used])
        tail = (p + n) % page
        if tail:  # the rest of the last page: garbage, as a reused page holds
            k_pages[rows[-1][-1], tail:] = float("nan")
            v_pages[rows[-1][-1], tail:] = float("nan")
        at += used
    width = max(len(r) for r in rows)
    table = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    total = sum(q_lens) + 2  # two rows of other sequences (decode rows), left unset
    qkv = torch.randn(total, heads + 2 * kv_heads, dim).to(dtype)
    q = qkv[:, :heads]
    starts = torch.tensor([1 + sum(q_lens[:i]) for i in range(len(q_lens))])
    scale = dim**-0.5
    out = cpu_kernels.paged_prefill(
        q,
        layer,
        table,
        starts,
        torch.tensor(q_lens),
        torch.tensor(prefixes),
        scale,
    )
    if cpu_isa_level == "none":  # no kernel below AVX2: the reference runs
        assert out is None
        return
    assert out is not None
    for i, (p, n) in enumerate(zip(prefixes, q_lens)):
        kk = tokens(k_pages, table[i], p + n).double().repeat_interleave(3, 1).transpose(0, 1)
        vv = tokens(v_pages, table[i], p + n).double().repeat_interleave(3, 1).transpose(0, 1)
        qq = q[starts[i] : starts[i] + n].double().transpose(0, 1)
        mask = torch.arange(p + n)[None, :] <= torch.arange(p, p + n)[:, None]
        expect = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale)
        got = out[starts[i] : starts[i] + n].double().transpose(0, 1)
        assert (got - expect).abs().max() <= (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize(
    "cap,window,prefixes,q_lens",
    [
        (5.0, 0, [0, 37], [50, 130]),  # a soft cap that bites, fresh and over a prefix
        (None, 20, [0, 300, 37], [70, 40, 130]),  # windows starting mid-page and mid-chunk
        (5.0, 64, [200], [100]),  # both; a window of whole chunks
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_prefill_with_a_soft_cap_and_a_window(
    cap, window, prefixes, q_lens, dtype, cpu_isa_level
):
    """The prefill kernel caps the scaled logits and masks each query to its last `window`
    positions; the pages behind the window of a sequence's first new token hold NaN and are
    not read."""
    torch.manual_seed(len(q_lens) + window)
    heads, kv_heads, dim, page = 8, 2, 64, 16
    layer = pool_kv(300, page, kv_heads, dim, dtype)
    perm, at, rows = torch.randperm(300).tolist(), 0, []
    for p, n in zip(prefixes, q_lens):
        used = -(-(p + n) // page)
        rows.append(perm[at : at + used])
        at += used
        if window and p - window + 1 > 0:  # wholly behind every new token's window
            unread = rows[-1][: (p - window + 1) // page]
            layer.k[unread], layer.v[unread] = float("nan"), float("nan")
    table = torch.tensor([r + [0] * (max(map(len, rows)) - len(r)) for r in rows])
    q = (3 * torch.randn(sum(q_lens), heads, dim)).to(dtype)
    starts = torch.tensor([sum(q_lens[:i]) for i in range(len(q_lens))])
    scale = dim**-0.5
    out = cpu_kernels.paged_prefill(
        q, layer, table, starts, torch.tensor(q_lens), torch.tensor(prefixes), scale, cap, window
    )
    if cpu_isa_level == "none":  # no kernel below AVX2: the reference runs
        assert out is None
        return
    assert out is not None and torch.isfinite(out).all()
    g = heads // kv_heads
    for i, (p, n) in enumerate(zip(prefixes, q_lens)):
        kk = tokens(layer.k, table[i], p + n).double().repeat_interleave(g, 1).transpose(0, 1)
        vv = tokens(layer.v, table[i], p + n).double().repeat_interleave(g, 1).transpose(0, 1)
        kk, vv = kk.nan_to_num(), vv.nan_to_num()  # masked below: any finite value does
        qq = q[starts[i] : starts[i] + n].double().transpose(0, 1)
        s = qq @ kk.transpose(1, 2) * scale
        s = cap * torch.tanh(s / cap) if cap else s
        pos, key = torch.arange(p, p + n)[:, None], torch.arange(p + n)[None, :]
        seen = (key <= pos) & ((key > pos - window) if window else True)
        expect = s.masked_fill(~seen, float("-inf")).softmax(-1) @ vv
        got = out[starts[i] : starts[i] + n].double().transpose(0, 1)
        # bfloat16 output: within its rounding, relative past 1 (large logits, large outputs)
        tol = 1e-2 * expect.abs().clamp(min=1) if dtype == torch.bfloat16 else 1e-5
        assert ((got - expect).abs() <= tol).all(), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_write_decode_reads_the_fused_projection_in_place(dtype, cpu_isa_level):
    """One layer of a decode batch in one call (write_decode), its q, k and v strided views of
    the fused QKV rows as the model passes them: the same pool (K, V and page summaries) as
    the reference write, and the same attention as the kernel over dense copies."""
    torch.manual_seed(7)
    heads, kv_heads, dim, page = 9, 3, 64, 16
    lens = [5, 16, 17, 40]  # the new token starts a page, ends one, or sits inside one
    fused = torch.randn(len(lens), heads + 2 * kv_heads, dim).to(dtype)
    q, k, v = fused.split([heads, kv_heads, kv_heads], dim=1)
    perm = torch.randperm(40).tolist()
    rows = [perm[10 * i : 10 * i + -(-n // page)] for i, n in enumerate(lens)]
    table = torch.tensor([r + [0] * (3 - len(r)) for r in rows])
    slots = torch.tensor([r[(n - 1) // page] * page + (n - 1) % page for r, n in zip(rows, lens)])
    where = ref.split_slots(slots, page)
    layers = [pool_kv(40, page, kv_heads, dim, dtype) for _ in range(2)]
    layers[1].k.copy_(layers[0].k), layers[1].v.copy_(layers[0].v)  # one pool, twice
    layers[1].kmin.copy_(layers[0].kmin), layers[1].kmax.copy_(layers[0].kmax)
    plan = cpu_kernels.decode_plan(layers[0], where, table, torch.tensor(lens))
    assert plan is not None
    out = cpu_kernels.write_decode(q, k, v, layers[0], plan, dim**-0.5)
    ref.write_kv(layers[1], where, k, v)
    for a, b in zip(layers[0][:4], layers[1][:4]):  # K, V and the page summaries
        assert torch.equal(a, b)
    dense = cpu_kernels.paged_decode(
        q.contiguous(), layers[1].k, layers[1].v, table, torch.tensor(lens), dim**-0.5
    )
    assert out is not None and dense is not None and torch.equal(out, dense)


def test_shared_pages_of_a_batch():
    """Whole pages every row starts with, before every newest token; none for few rows."""
    t = torch.tensor(
        [[5, 6, 7, 8, 9, 1], [5, 6, 7, 8, 9, 2], [5, 6, 7, 8, 3, 0], [5, 6, 7, 8, 9, 4]]
    )
    assert cpu_kernels.shared_pages(t, torch.tensor([90, 90, 70, 90]), 16) == 4
    assert cpu_kernels.shared_pages(t, torch.tensor([90, 90, 64, 90]), 16) == 0  # 3 whole
    assert cpu_kernels.shared_pages(t[:3], torch.tensor([90, 90, 70]), 16) == 0  # 3 rows


def test_cpu_decode_kernel_declines_what_it_does_not_take():
    q = torch.randn(2, 4, 8, dtype=torch.float16)
    pages = torch.randn(2, 8, 2, 8, dtype=torch.float16)
    table, lens = torch.zeros(2, 1, dtype=torch.int64), torch.tensor([3, 4])
    assert cpu_kernels.paged_decode(q, pages, pages, table, lens, 1.0) is None
    k, v = pool_layer(4, 8, 2, 8, torch.float32)  # pages that are not dense blocks
    assert cpu_kernels.paged_decode(q.float(), k.mT, v.mT, table, lens, 1.0) is None


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("dim", [576, 100])  # 100: 16-lane vectors, then a tail of 4
def test_cpu_add_rms_norm_equals_torch_add_then_rms_norm(rows, with_delta, dim, cpu_isa_level):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, dim, generator=g) * 3).to(torch.bfloat16)
    delta = torch.randn(rows, dim, generator=g).to(torch.bfloat16) if with_delta else None
    w = (torch.rand(dim, generator=g) + 0.5).to(torch.bfloat16)
    want_x = x + delta if delta is not None else x.clone()
    want = F.rms_norm(want_x, (dim,), w, 1e-5)
    got = cpu_ops.add_rms_norm(x, delta, w, 1e-5)
    assert got is not None
    assert torch.equal(x, want_x)  # the residual add, in place, rounded as torch rounds it
    # one rounding of the same float32 value; the sum of squares is folded in torch's order,
    # but a rare element (torch's order for long rows is not quite ours) is one bf16 ulp off
    assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=0)
    assert (got != want).float().mean().item() < 0.001


def test_cpu_add_rms_norm_declines_other_dtypes_and_layouts():
    w = torch.ones(8)
    assert cpu_ops.add_rms_norm(torch.ones(2, 8), None, w, 1e-5) is None  # float32
    x = torch.ones(8, 2, dtype=torch.bfloat16).t()  # not contiguous
    assert cpu_ops.add_rms_norm(x, None, w.to(torch.bfloat16), 1e-5) is None


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("width", [1536, 20])  # 20: a 16-lane vector, then a tail of 4
def test_cpu_silu_mul_equals_torch_chunk_silu_mul(rows, width, cpu_isa_level):
    g = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * width, generator=g) * 4).to(torch.bfloat16)
    gate_up[0, :8] = torch.tensor([0.0, -0.0, 30.0, -30.0, 90.0, -90.0, 1e-3, -1e-3])
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = cpu_ops.silu_mul(gate_up)
    assert got is not None
    # the same two roundings; its exp is not torch's, so a rare element may be one ulp off
    assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=0)
    assert (got != want).float().mean().item() < 0.001
    assert cpu_ops.silu_mul(gate_up.float()) is None  # float32: torch's ops
    assert cpu_ops.silu_mul(torch.zeros(4, 8, dtype=torch.bfloat16).t()) is None  # strided


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_cpu_rope_in_place_equals_rotary_embedding(rows, cpu_isa_level):
    from strata.model.rope import RotaryEmbedding

    rope = RotaryEmbedding(64, 4096, 100000.0, {}, torch.bfloat16, torch.device("cpu"))
    g = torch.Generator().manual_seed(rows)
    qkv = torch.randn(rows, (9 + 3 + 3) * 64, generator=g).to(torch.bfloat16)
    positions = torch.randint(0, 4000, (rows,), generator=g)
    cos, sin = rope.tables(positions)
    heads = qkv[:, : 12 * 64].view(rows, 12, 64)  # q and k heads, rows strided by v
    want = rope.apply(heads, cos, sin)
    v_before = qkv[:, 12 * 64 :].clone()
    assert cpu_ops.rope_(heads, cos, sin)
    assert torch.equal(heads, want)  # the same three roundings as torch's ops
    assert torch.equal(qkv[:, 12 * 64 :], v_before)


@pytest.mark.parametrize("prefix_len,window", [(37, 8), (37, 5), (3, 8), (0, 4)])
def test_windowed_prefill_reads_the_window_and_masks_it(prefix_len, window):
    """A sliding-window prefill over cached pages (the pages before every query's window
    left unread) equals dense attention under the window's mask."""
    torch.manual_seed(0)
    k_pages, v_pages = pool_layer(16, PS, KVH, D, torch.float32)
    q_len = 6
    n = prefix_len + q_len
    page_ids = torch.randperm(16)[: -(-n // PS)]
    keys, values = tokens(k_pages, page_ids, n), tokens(v_pages, page_ids, n)
    q = torch.randn(q_len, KVH * G, D)
    got = ref.paged_prefill(
        q,
        keys[prefix_len:],
        values[prefix_len:],
        k_pages,
        v_pages,
        page_ids,
        prefix_len,
        0.25,
        window=window,
    )
    for r in range(q_len):
        pos = prefix_len + r
        lo = max(0, pos - window + 1)
        want = dense(q[r], keys[lo : pos + 1], values[lo : pos + 1], 0.25)
        assert torch.allclose(got[r], want, atol=1e-5), (r, (got[r] - want).abs().max())
