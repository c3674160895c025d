"""Hand-written CPU kernels: C sources beside this file, built once with the system C compiler
(`-O3 -march=native -fopenmp`) into the cache dir and loaded with ctypes.

torch is imported first, so the kernels' OpenMP resolves to the runtime torch already loaded
and shares its threads. With no compiler, or with ``STRATA_CPU_KERNELS=0``, every op here
returns None and the caller uses the torch reference (strata/attention/reference.py), which
is also the oracle the kernels are tested against.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from strata.attention import reference
from strata.config import cache_dir, env, system_env
from strata.kv.pool import LayerKV

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_decode.c")  # also write_kv and select_pages
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# NOTE: a work item reads at least this many pages, so splitting a long context over the
# threads never costs more in merging than it saves.
MIN_PAGES_PER_SPLIT = 4


def enabled() -> bool:
    return env("CPU_KERNELS", "1") != "0"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build(
    compiler: str | None = None,
    source: Path = SOURCE,
    flags: Sequence[str] = FLAGS,
    libs: Sequence[str] = ("-lm",),
) -> Path:
    """Compile a source beside this package (by default the kernels; once per source, flags
    and CPU) and return the shared library."""
    cc = compiler or system_env("CC") or "gcc"
    key = hashlib.sha256(
        source.read_bytes() + " ".join([cc, *flags, *libs]).encode() + _cpu_flags().encode()
    ).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        cmd = [cc, *flags, str(source), "-o", str(built), *libs]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
        os.replace(built, out)  # atomic: processes building at once all end with one file
    return out


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


@functools.cache
def library() -> ctypes.CDLL | None:
    if not enabled():
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("CPU kernels unavailable, using the torch reference ops: %s", e)
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    i64p = p  # int64 arrays, passed by address
    i64 = ctypes.c_int64
    lib.paged_decode.argtypes = [
        i, p, p, p, p, i64p, i64p, i, i, i, i, i, i, i64, ctypes.c_float, i, i
    ]  # fmt: skip
    lib.write_kv.argtypes = [i, p, p, p, p, i64p, i64p, i64, i, i, i, i64]
    lib.select_pages.argtypes = [
        i, p, p, p, i64p, i64p, p, i, i, i, i, i, i, i64, ctypes.c_float, ctypes.c_float, i64,
        ctypes.c_double, i, i, i64p, i64p, p, i64, i64, i64, i64p, i64p, i64p, p,
    ]  # fmt: skip
    lib.sparse_decode.argtypes = [
        i, p, p, p, p, p, p, i64p, i64p, p, i, i, i, i, i, i, i64, ctypes.c_float,
        ctypes.c_float, i64, ctypes.c_double, i, i, i64p, i64p, p, i64, i64, i64, i, i64p, p,
    ]  # fmt: skip
    lib.add_rms_norm.argtypes = [p, p, p, p, i64, i, ctypes.c_float]
    lib.rope_bf16.argtypes = [p, i64, i, i, i64, p, p]
    lib.silu_mul_bf16.argtypes = [p, p, i64, i64]
    lib.write_decode.argtypes = [
        i, p, p, p, p, i64p, i64p, i64, p, p, i64p, i64p, i, i, i, i, i, i, i64,
        ctypes.c_float, i,
    ]  # fmt: skip
    for fn in (lib.paged_decode, lib.write_kv, lib.select_pages, lib.sparse_decode,
               lib.add_rms_norm, lib.rope_bf16, lib.silu_mul_bf16, lib.write_decode):  # fmt: skip
        fn.restype = i
    return lib


def available(device: torch.device) -> bool:
    return device.type == "cpu" and library() is not None


def _ptr(t: torch.Tensor) -> int:
    """A tensor's address for a pointer argument (ctypes takes a plain int)."""
    return t.data_ptr()


def _page_contiguous(pages: torch.Tensor) -> bool:
    """Each page of [pages, page_size, kv_heads, D] one dense block (pages may be strided)."""
    _, _, h, d = pages.shape
    return pages.stride()[1:] == (h * d, d, 1)


def _i64(t: torch.Tensor) -> int:
    """An int64 tensor's address (the argtypes take int64 arrays as void pointers)."""
    return t.data_ptr()


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
        _splits(b * groups, width), groups,
    )  # fmt: skip
    return out if rc == 0 else None


def paged_decode(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor | None:
    """reference.paged_decode's contract, with lengths instead of a mask: q [batch, heads, D];
    k_pages, v_pages [pages, page_size, kv_heads, D]; page_table [batch, width]; seq_lens
    [batch]. None where the kernel does not apply (no library, dtype, device or shape)."""
    return _decode(q, k_pages, v_pages, page_table, seq_lens, scale, groups=1)


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


def decode_plan(
    layer: LayerKV, where: tuple[torch.Tensor, torch.Tensor], table: torch.Tensor,
    lens: torch.Tensor,
) -> DecodePlan | None:  # fmt: skip
    """A DecodePlan for the pool whose layers look like `layer`; None where write_decode
    does not apply (no library, or a pool layout the kernels do not read)."""
    kp, vp = layer.k, layer.v
    if library() is None or kp.device.type != "cpu" or kp.dtype not in DTYPES:
        return None
    _, ps, kv_heads, d = kp.shape
    summary_at = kp.data_ptr() + ps * kv_heads * d * kp.element_size()  # row ps of page 0
    if not _page_contiguous(kp) or kp.stride() != vp.stride():
        return None
    if layer.kmin.data_ptr() != summary_at:
        return None
    pages, offsets = (w.to(torch.int64).contiguous() for w in where)
    table, lens = table.to(torch.int64).contiguous(), lens.to(torch.int64).contiguous()
    return DecodePlan(pages, offsets, table, lens, _splits(table.shape[0], table.shape[1]))


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
        d, ps, kp.stride(0), scale, plan.splits,
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
    _, ps, kv_heads, d = kp.shape
    row = kv_heads * d
    summary_at = kp.data_ptr() + ps * row * kp.element_size()  # row ps of page 0
    if not _page_contiguous(kp) or kp.stride() != vp.stride():
        return False
    if layer.kmin.data_ptr() != summary_at:
        return False
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
