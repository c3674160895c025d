"""Hand-written CPU kernels (cpu_decode.c, cpu_ops.c; built and loaded by cpu_build.py) for torch
tensors: each op checks what the kernel needs and returns None (or False) where it does not
apply, and the caller then uses the torch reference (strata/attention/reference.py), which
is also the oracle the kernels are tested against.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from strata.attention import reference
from strata.attention.cpu_build import library
from strata.kv.pool import LayerKV

DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# NOTE: a work item reads at least this many pages, so splitting a long context over the
# threads never costs more in merging than it saves.
MIN_PAGES_PER_SPLIT = 4


def _segments(
    segments: reference.Segments | None, layer: int, dtype: torch.dtype
) -> tuple[int, ...] | None:
    """The seg_* arguments of cpu_decode.c for one layer (zeros without segments); None
    when their layout does not fit (the caller falls back to the reference)."""
    if segments is None:
        return (0, 0, 0, 0, 0, 0)
    ends, counts, sums = segments  # as TorchAttention builds them: int64, contiguous
    if sums.dtype != dtype or not sums.is_contiguous():
        return None
    _, width, layers, _, kv_heads, d = sums.shape
    row = 2 * kv_heads * d  # one layer of one segment
    return (ends.data_ptr(), counts.data_ptr(), sums.data_ptr(), width, layers * row, layer * row)


def available(device: torch.device) -> bool:
    return device.type == "cpu" and library() is not None


def _ptr(t: torch.Tensor) -> int:
    """A tensor's address for a pointer argument (ctypes takes a plain int)."""
    return t.data_ptr()


def _page_contiguous(pages: torch.Tensor) -> bool:
    """Each page of [pages, page_size, kv_heads, D] one dense block (pages may be strided)."""
    _, _, h, d = pages.shape
    return pages.stride()[1:] == (h * d, d, 1)


def _pool_layout(layer: LayerKV) -> bool:
    """A layer of KVCache's page-major pool as the KV writes expect it: dense pages, K and V
    alike, and the page summary in row page_size of each page's K (and V)."""
    kp, vp = layer.k, layer.v
    _, ps, kv_heads, d = kp.shape
    summary_at = kp.data_ptr() + ps * kv_heads * d * kp.element_size()  # row ps of page 0
    return (
        _page_contiguous(kp) and kp.stride() == vp.stride() and layer.kmin.data_ptr() == summary_at
    )


def _i64(t: torch.Tensor) -> int:
    """An int64 tensor's address (the argtypes take int64 arrays as void pointers)."""
    return t.data_ptr()


# NOTE: shared_pages reads a prefix once for the batch from this many pages and sequences;
# at 2 sequences it was 5% slower than reading it per sequence (int4 decode step, 400 shared
# tokens: 5.17 against 4.94 ms), from 4 faster (bf16 13.11 against 13.58 ms)
MIN_SHARED_PAGES = 4
MIN_SHARED_BATCH = 4


def _splits(work_items: int, width: int) -> int:
    want = -(-2 * torch.get_num_threads() // work_items)  # splits per work item
    return max(1, min(want, width // MIN_PAGES_PER_SPLIT))


def _decode(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    groups: int,
    shared: int = 0,
) -> torch.Tensor | None:
    lib = library()
    dtype = DTYPES.get(q.dtype)
    if lib is None or dtype is None or q.device.type != "cpu" or k_pages.dtype != q.dtype:
        return None
    if k_pages.stride() != v_pages.stride() or not _page_contiguous(k_pages):
        return None
    b, heads, d = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    q = q.contiguous()
    # NOTE: no-ops for the backend, which prepares both once per forward, not per layer
    table = tables.to(torch.int64).contiguous()
    lens = lens.to(torch.int64).contiguous()
    width = table.shape[-1]
    out = torch.empty_like(q)
    rc = lib.paged_decode(
        dtype, _ptr(q), _ptr(k_pages), _ptr(v_pages), _ptr(out), _i64(table), _i64(lens),
        b, width, heads, kv_heads, d, page_size, k_pages.stride(0), scale,
        _splits(b * groups, width), groups, shared,
    )  # fmt: skip
    return out if rc == 0 else None


def paged_decode(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    shared: int = 0,
) -> torch.Tensor | None:
    """reference.paged_decode's contract, with lengths instead of a mask: q [batch, heads, D];
    k_pages, v_pages [pages, page_size, kv_heads, D]; page_table [batch, width]; seq_lens
    [batch]. shared: the first columns of page_table, equal in every row, that the kernel
    may read once for every sequence (shared_pages). None where the kernel does not apply
    (no library, dtype, device or shape)."""
    return _decode(q, k_pages, v_pages, page_table, seq_lens, scale, groups=1, shared=shared)


def paged_decode_selected(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    table: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> torch.Tensor | None:
    """reference.paged_decode_selected: each KV head reads its own pages, in place."""
    return _decode(q, k_pages, v_pages, table, lens, scale, groups=k_pages.shape[2])


class DecodePlan(NamedTuple):
    """What write_decode needs of a decode-only batch, checked and converted once per forward
    (the tensors are kept so that their addresses stay valid)."""

    pages: torch.Tensor  # [T] int64: each new token's page
    offsets: torch.Tensor  # [T] int64: its offset in the page
    table: torch.Tensor  # [B, W] int64
    lens: torch.Tensor  # [B] int64
    splits: int
    shared: int  # shared_pages of the table


def shared_pages(table: torch.Tensor, lens: torch.Tensor, page_size: int) -> int:
    """The pages every row of table [B, W] starts with (a shared prompt's: the radix cache
    gives them the same ids), whole and before every sequence's newest token; 0 below
    MIN_SHARED_BATCH rows or MIN_SHARED_PAGES pages. paged_decode then reads them once for
    every sequence, as matrix products on AMX tiles (bfloat16, head_dim 64, pages of 16
    tokens; elsewhere per sequence, as before)."""
    if table.shape[0] < MIN_SHARED_BATCH:
        return 0
    same = int((table == table[:1]).all(0).to(torch.int32).cumprod(0).sum())
    shared = min(same, (int(lens.min()) - 1) // page_size)
    return shared if shared >= MIN_SHARED_PAGES else 0


def shared_decode_available() -> bool:
    """Whether paged_decode reads shared pages once for the batch on this CPU."""
    lib = library()
    return lib is not None and bool(lib.shared_decode_available())


def decode_plan(
    layer: LayerKV, where: tuple[torch.Tensor, torch.Tensor], table: torch.Tensor,
    lens: torch.Tensor,
) -> DecodePlan | None:  # fmt: skip
    """A DecodePlan for the pool whose layers look like `layer`; None where write_decode
    does not apply (no library, or a pool layout the kernels do not read)."""
    kp = layer.k
    if library() is None or kp.device.type != "cpu" or kp.dtype not in DTYPES:
        return None
    if not _pool_layout(layer):
        return None
    pages, offsets = (w.to(torch.int64).contiguous() for w in where)
    table, lens = table.to(torch.int64).contiguous(), lens.to(torch.int64).contiguous()
    ps = kp.shape[1]
    return DecodePlan(pages, offsets, table, lens, _splits(table.shape[0], table.shape[1]),
                      shared_pages(table, lens, ps))  # fmt: skip


def write_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerKV, plan: DecodePlan,
    scale: float,
) -> torch.Tensor | None:  # fmt: skip
    """write_kv then paged_decode for one layer of a decode-only batch, in one call; None
    where it does not apply (the caller then writes and decodes as usual: the write is
    idempotent)."""
    kp, vp = layer.k, layer.v
    lib, dtype = library(), DTYPES.get(q.dtype)
    if lib is None or dtype is None or kp.dtype != q.dtype or k.dtype != q.dtype:
        return None
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, heads, d = q.shape
    _, ps, kv_heads, _ = kp.shape
    out = torch.empty_like(q)
    rc = lib.write_decode(
        dtype, k.data_ptr(), v.data_ptr(), kp.data_ptr(), vp.data_ptr(), plan.pages.data_ptr(),
        plan.offsets.data_ptr(), k.shape[0], q.data_ptr(), out.data_ptr(),
        plan.table.data_ptr(), plan.lens.data_ptr(), b, plan.table.shape[1], heads, kv_heads,
        d, ps, kp.stride(0), scale, plan.splits, plan.shared,
    )  # fmt: skip
    return out if rc == 0 else None


def write_kv(
    layer: LayerKV, where: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor
) -> bool:
    """reference.write_kv (with the page summaries); False where the kernel does not apply."""
    lib = library()
    dtype = DTYPES.get(k.dtype)
    kp, vp = layer.k, layer.v
    if lib is None or dtype is None or k.device.type != "cpu" or kp.dtype != k.dtype:
        return False
    if not _pool_layout(layer):
        return False
    _, ps, kv_heads, d = kp.shape
    pages, offsets = (w.to(torch.int64).contiguous() for w in where)
    k, v = k.contiguous(), v.contiguous()
    lib.write_kv(dtype, _ptr(k), _ptr(v), _ptr(kp), _ptr(vp), _i64(pages), _i64(offsets),
                 k.shape[0], kv_heads, d, ps, kp.stride(0))  # fmt: skip
    return True


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor | None:
    """x += delta in place, then rms_norm(x) * weight, for bfloat16 [rows, dim] on CPU (one
    call instead of torch's add, upcast, reduce, scale and downcast); None where it does not
    apply, and x is untouched then."""
    lib = library()
    ok = x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2
    if lib is None or not ok or not x.is_contiguous():
        return None
    if delta is not None:
        if delta.dtype != x.dtype or delta.shape != x.shape:
            return None
        delta = delta.contiguous()
    out = torch.empty_like(x)
    lib.add_rms_norm(_ptr(delta) if delta is not None else None, _ptr(x), _ptr(weight),
                     _ptr(out), x.shape[0], x.shape[1], eps)  # fmt: skip
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up of a fused gate/up projection's output [rows, 2 * n] (bfloat16, CPU)
    in one call instead of torch's chunk, silu and mul; None where it does not apply."""
    lib = library()
    ok = gate_up.dtype == torch.bfloat16 and gate_up.device.type == "cpu" and gate_up.dim() == 2
    if lib is None or not ok or not gate_up.is_contiguous():
        return None
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(rows, n)
    lib.silu_mul_bf16(_ptr(gate_up), _ptr(out), rows, n)
    return out


# NOTE: the most rows linear_packed takes: AMX is faster than oneDNN's call up to 64 rows
# (the embedded model's shapes, 2 cores); from ~128 rows oneDNN, which blocks for the caches.
PACKED_ROWS = 64


def linear_packed(
    x: torch.Tensor, address: int, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor | None:
    """x [rows, k] (bfloat16, CPU, 1..PACKED_ROWS rows) times the oneDNN-packed bfloat16
    weight at `address` [out_features, k] (Linear checks its layout), plus bias, rounded to
    bfloat16 once: AMX, or AVX512-BF16 for 1-2 rows (cpu_ops.c); None where neither
    applies."""
    lib = library()
    if lib is None or x.dtype != torch.bfloat16 or x.dim() != 2 or not 1 <= len(x) <= PACKED_ROWS:
        return None
    rows = x.shape[0]
    x = x.contiguous()
    y = x.new_empty(rows, out_features)
    rc = lib.linear_packed_bf16(_ptr(x), address, _ptr(bias) if bias is not None else None,
                                _ptr(y), rows, out_features, x.shape[1])  # fmt: skip
    return y if rc == 0 else None


@functools.cache
def int4_available() -> bool:
    """Whether cpu_ops.c's int4 kernels run here (built, with AVX512-BF16)."""
    lib = library()
    if lib is None:
        return False
    x = torch.zeros(1, 32, dtype=torch.bfloat16)
    w = torch.zeros(1, 1, 8 * 32 + 64, dtype=torch.uint8)
    y = torch.empty(1, 16, dtype=torch.bfloat16)
    return lib.int4_linear_bf16(_ptr(x), _ptr(w), None, _ptr(y), 1, 16, 32, 32) == 0


def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
    group: int,
) -> torch.Tensor:  # fmt: skip
    """x [rows, k] (bfloat16) times linear.pack_int4's weight, plus bias, rounded to bfloat16
    once (cpu_ops.c: 1 row AVX512-BF16, 2-16 rows AMX tiles, more rows the weight unpacked
    to bfloat16 for AMX). Only where int4_available()."""
    lib = library()
    if lib is None or x.dtype != torch.bfloat16 or x.dim() != 2:
        raise ValueError(f"int4_linear takes bfloat16 rows on CPU, not {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    y = x.new_empty(x.shape[0], out_features)
    if not len(x):
        return y
    rc = lib.int4_linear_bf16(_ptr(x), _ptr(packed), _ptr(bias) if bias is not None else None,
                              _ptr(y), x.shape[0], out_features, x.shape[1], group)  # fmt: skip
    if rc:
        raise RuntimeError(f"int4_linear failed ({rc})")
    return y


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """RotaryEmbedding.apply in place on bfloat16 heads x [T, heads, D] on CPU (rows may be
    strided, heads dense), with cos, sin [T, 1, D]; False where it does not apply."""
    lib = library()
    t, heads, d = x.shape
    ok = x.dtype == cos.dtype == sin.dtype == torch.bfloat16 and x.device.type == "cpu"
    if lib is None or not ok or d % 2 or d > 256 or x.stride()[1:] != (d, 1):
        return False
    if not (cos.is_contiguous() and sin.is_contiguous()) or cos.shape != (t, 1, d):
        return False
    lib.rope_bf16(_ptr(x), t, heads, d, x.stride(0), _ptr(cos), _ptr(sin))
    return True


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
    segments: reference.Segments | None = None,
    layer: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """reference.select_pages, batched in C; None where the kernel does not apply."""
    lib = library()
    dtype = DTYPES.get(q.dtype)
    if lib is None or dtype is None or q.device.type != "cpu" or kmin.dtype != q.dtype:
        return None
    segs = _segments(segments, layer, q.dtype)
    if segs is None:
        return None
    if kmin.stride() != kmax.stride() or kmin.stride()[1:] != (kmin.shape[2], 1):
        return None
    b, heads, d = q.shape
    kv_heads = kmin.shape[1]
    q = q.contiguous()
    table = page_table.to(torch.int64).contiguous()
    lens = seq_lens.to(torch.int64).contiguous()
    act = active.to(torch.uint8).contiguous()
    width = table.shape[1]
    out = torch.zeros(b, kv_heads, width, dtype=torch.int64)
    out_lens = torch.empty(b, kv_heads, dtype=torch.int64)
    kept = torch.empty(b, kv_heads, dtype=torch.int64)
    count, fraction = (int(budget), 0.0) if budget >= 1 else (0, float(budget))
    rc = lib.select_pages(
        dtype, _ptr(q), _ptr(kmin), _ptr(kmax), _i64(table), _i64(lens), _ptr(act), b, width,
        heads, kv_heads, d, page_size, kmin.stride(0), scale, min_score, count, fraction, sink,
        window, *segs, _i64(out), _i64(out_lens), _i64(kept), None,
    )  # fmt: skip
    return (out, out_lens, kept) if rc == 0 else None


def sparse_decode(
    q: torch.Tensor,
    layer: LayerKV,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    active: torch.Tensor,
    scale: float,
    min_score: float,
    budget: float,
    sink: int,
    window: int,
    touched: torch.Tensor | None = None,
    segments: reference.Segments | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """select_pages then paged_decode_selected, in one call (no tables cross into Python):
    (attention [B, heads, D], kept [B, kv_heads]); None where the kernel does not apply.
    page_table, seq_lens: int64 and contiguous; active: uint8. touched (uint8 [B, W],
    contiguous): set to 1 at the index of every page some KV head kept. segments: the
    coarse level of the selection (reference.Segments)."""
    lib = library()
    dtype = DTYPES.get(q.dtype)
    k_pages, v_pages, kmin, kmax = layer.k, layer.v, layer.kmin, layer.kmax
    if lib is None or dtype is None or q.device.type != "cpu" or k_pages.dtype != q.dtype:
        return None
    segs = _segments(segments, layer.layer_id, q.dtype)
    if segs is None:
        return None
    if k_pages.stride() != v_pages.stride() or not _page_contiguous(k_pages):
        return None
    if kmin.stride() != kmax.stride() or kmin.stride(0) != k_pages.stride(0):
        return None
    b, heads, d = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    q = q.contiguous()
    width = page_table.shape[1]
    out = torch.empty_like(q)
    kept = torch.empty(b, kv_heads, dtype=torch.int64)
    count, fraction = (int(budget), 0.0) if budget >= 1 else (0, float(budget))
    rc = lib.sparse_decode(
        dtype, _ptr(q), _ptr(k_pages), _ptr(v_pages), _ptr(out), _ptr(kmin), _ptr(kmax),
        _i64(page_table), _i64(seq_lens), _ptr(active), b, width, heads, kv_heads, d,
        page_size, k_pages.stride(0), scale, min_score, count, fraction, sink, window, *segs,
        _splits(b * kv_heads, width), _i64(kept), _ptr(touched) if touched is not None else None,
    )  # fmt: skip
    return (out, kept) if rc == 0 else None
