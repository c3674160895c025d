"""Attention ops against each other and against a dense per-sequence oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from strata.attention import cpu_kernels
from strata.attention import reference as ref
from strata.kv.pool import KVCache

PS, KVH, G, D = 4, 2, 3, 16


def pool_layer(pages, page_size, kv_heads, dim, dtype):
    """One layer's (K, V) page views of a random three-layer pool: strided, as the engine's."""
    kv = KVCache(3, pages, page_size, kv_heads, dim, dtype, "cpu")
    kv.data.copy_(torch.randn(kv.data.shape))
    return kv.layers[1][:2]


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
    ],
)
def test_cpu_decode_kernel_equals_dense_attention(heads, kv_heads, dim, page, lens, dtype, tol):
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


def test_cpu_decode_kernel_declines_what_it_does_not_take():
    q = torch.randn(2, 4, 8, dtype=torch.float16)
    pages = torch.randn(2, 8, 2, 8, dtype=torch.float16)
    table, lens = torch.zeros(2, 1, dtype=torch.int64), torch.tensor([3, 4])
    assert cpu_kernels.paged_decode(q, pages, pages, table, lens, 1.0) is None
    k, v = pool_layer(4, 8, 2, 8, torch.float32)  # pages that are not dense blocks
    assert cpu_kernels.paged_decode(q.float(), k.mT, v.mT, table, lens, 1.0) is None
