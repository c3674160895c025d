"""Hand-written CPU attention kernels (cpu_decode.c; built and loaded by build.py) for
torch tensors: each op checks what the kernel needs and returns None (or False) where it does
not apply, and the caller then uses the torch reference (strata/attention/reference.py),
which is also the oracle the kernels are tested against. The model's other ops (cpu_ops.c)
are wrapped in strata/kernels/cpu/ops.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from strata.kernels.cpu.build import library
from strata.kv.pool import LayerKV, Segments

DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# NOTE: a work item reads at least this many pages, so splitting a long context over the
# threads never costs more in merging than it saves.
MIN_PAGES_PER_SPLIT = 4


def _segments(segments: Segments | None, layer: int, dtype: torch.dtype) -> tuple[int, ...] | None:
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


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, D] as the kernels read it: each token's heads one dense row, rows any
    stride apart (a view of the fused QKV projection stays a view)."""
    _, h, d = x.shape
    return x if x.stride()[1:] == (d, 1) and x.stride(0) >= h * d else x.contiguous()


def _kv_rows(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v as _rows, with one row stride for both (the kernels take one)."""
    k, v = _rows(k), _rows(v)
    return (k, v) if k.stride(0) == v.stride(0) else (k.contiguous(), v.contiguous())


def _i64(t: torch.Tensor) -> int:
    """An int64 tensor's address (the argtypes take int64 arrays as void pointers)."""
    return t.data_ptr()


# NOTE: shared_pages reads a prefix once for the batch from this many pages and sequences;
# on AMX at 2 sequences it was 5% slower than reading it per sequence (int4 decode step, 400
# shared tokens: 5.17 against 4.94 ms), from 4 faster (bf16 13.11 against 13.58 ms); on AVX2
# (EPYC, 2 cores; 400 shared + 100 own tokens) 13.2 against 16.1 ms at 4, 73.4 against 83.4
# at 32 (bench/shared_prefix.py)
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
    cap: float | None = None,
    window: int = 0,
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
    rc = lib.paged_decode_capped(
        dtype,
        _ptr(q),
        _ptr(k_pages),
        _ptr(v_pages),
        _ptr(out),
        _i64(table),
        _i64(lens),
        b,
        width,
        heads,
        kv_heads,
        d,
        page_size,
        k_pages.stride(0),
        scale,
        _splits(b * groups, width),
        groups,
        shared,
        heads * d,
        cap or 0.0,
        window,
    )
    return out if rc == 0 else None


def paged_decode(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    shared: int = 0,
    cap: float | None = None,
    window: int = 0,
) -> torch.Tensor | None:
    """reference.paged_decode's contract, with lengths instead of a mask: q [batch, heads, D];
    k_pages, v_pages [pages, page_size, kv_heads, D]; page_table [batch, width]; seq_lens
    [batch]. shared: the first columns of page_table, equal in every row, that the kernel
    may read once for every sequence (shared_pages). cap: the logits' tanh soft cap; window:
    each sequence sees its last `window` keys only (0: all), the pages before them unread.
    None where the kernel does not apply (no library, dtype, device or shape)."""
    return _decode(
        q, k_pages, v_pages, page_table, seq_lens, scale, 1, shared, cap=cap, window=window
    )


def paged_prefill(
    q: torch.Tensor,
    layer: LayerKV,
    table: torch.Tensor,
    starts: torch.Tensor,
    q_lens: torch.Tensor,
    prefix_lens: torch.Tensor,
    scale: float,
    cap: float | None = None,
    window: int = 0,
) -> torch.Tensor | None:
    """reference.paged_prefill for every prefilling sequence of a forward at once, read from
    the pages in place (their new K and V already written), on AMX tiles or AVX2: q [T,
    heads, D] (token rows may be strided); sequence i's q_lens[i] rows from starts[i], at
    positions prefix_lens[i].., its pages in row i of table (int64). Returns out [T, heads,
    D] with those rows set; None where the kernel does not apply (float32 or bfloat16,
    pages of 16 tokens, head_dim a multiple of 8 up to 128; AMX tiles take bfloat16 at
    head_dim 64, without a cap or a window; below AVX2 none). cap: the logits' tanh soft cap;
    window: each query sees its last `window` positions only, the pages behind its block's
    first query's window unread."""
    lib = library()
    kp, vp = layer.k, layer.v
    if lib is None or q.dtype not in DTYPES or kp.dtype != q.dtype or q.device.type != "cpu":
        return None
    if kp.stride() != vp.stride() or not _page_contiguous(kp):
        return None
    q = _rows(q)
    t, heads, d = q.shape
    _, page_size, kv_heads, _ = kp.shape
    out = q.new_empty(t, heads, d)
    rc = lib.paged_prefill_capped(
        DTYPES[q.dtype],
        _ptr(q),
        q.stride(0),
        _ptr(kp),
        _ptr(vp),
        _ptr(out),
        _i64(starts),
        _i64(q_lens),
        _i64(prefix_lens),
        _i64(table),
        len(starts),
        table.shape[1],
        heads,
        kv_heads,
        d,
        page_size,
        kp.stride(0),
        scale,
        cap or 0.0,
        window,
    )
    return out if rc == 0 else None


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
    every sequence (shared_decode_available), as matrix products on AMX tiles or in AVX2
    blocks; elsewhere per sequence."""
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
    layer: LayerKV,
    where: tuple[torch.Tensor, torch.Tensor],
    table: torch.Tensor,
    lens: torch.Tensor,
) -> DecodePlan | None:
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
    return DecodePlan(
        pages,
        offsets,
        table,
        lens,
        _splits(table.shape[0], table.shape[1]),
        shared_pages(table, lens, ps),
    )


def write_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: LayerKV,
    plan: DecodePlan,
    scale: float,
) -> torch.Tensor | None:
    """write_kv then paged_decode for one layer of a decode-only batch, in one call; None
    where it does not apply (the caller then writes and decodes as usual: the write is
    idempotent)."""
    kp, vp = layer.k, layer.v
    lib, dtype = library(), DTYPES.get(q.dtype)
    if lib is None or dtype is None or kp.dtype != q.dtype or k.dtype != q.dtype:
        return None
    q, (k, v) = _rows(q), _kv_rows(k, v)
    b, heads, d = q.shape
    _, ps, kv_heads, _ = kp.shape
    out = q.new_empty(b, heads, d)
    rc = lib.write_decode(
        dtype,
        k.data_ptr(),
        v.data_ptr(),
        kp.data_ptr(),
        vp.data_ptr(),
        plan.pages.data_ptr(),
        plan.offsets.data_ptr(),
        k.shape[0],
        q.data_ptr(),
        out.data_ptr(),
        plan.table.data_ptr(),
        plan.lens.data_ptr(),
        b,
        plan.table.shape[1],
        heads,
        kv_heads,
        d,
        ps,
        kp.stride(0),
        scale,
        plan.splits,
        plan.shared,
        q.stride(0),
        k.stride(0),
    )
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
    k, v = _kv_rows(k, v)
    lib.write_kv(
        dtype,
        _ptr(k),
        _ptr(v),
        _ptr(kp),
        _ptr(vp),
        _i64(pages),
        _i64(offsets),
        k.shape[0],
        kv_heads,
        d,
        ps,
        kp.stride(0),
        k.stride(0),
    )
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
    segments: Segments | None = None,
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
        dtype, _ptr(q), _ptr(kmin), _ptr(kmax), _i64(table), _i64(lens), _ptr(act),
        b, width, heads, kv_heads, d, page_size, kmin.stride(0),
        scale, min_score, count, fraction, sink, window, *segs,
        _i64(out), _i64(out_lens), _i64(kept), None,
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
    segments: Segments | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """select_pages then paged_decode_selected, in one call (no tables cross into Python):
    (attention [B, heads, D], kept [B, kv_heads]); None where the kernel does not apply.
    page_table, seq_lens: int64 and contiguous; active: uint8. touched (uint8 [B, W],
    contiguous): set to 1 at the index of every page some KV head kept. segments: the
    coarse level of the selection (Segments)."""
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
        _i64(page_table), _i64(seq_lens), _ptr(active),
        b, width, heads, kv_heads, d, page_size, k_pages.stride(0),
        scale, min_score, count, fraction, sink, window, *segs,
        _splits(b * kv_heads, width), _i64(kept), _ptr(touched) if touched is not None else None,
    )  # fmt: skip
    return (out, kept) if rc == 0 else None
