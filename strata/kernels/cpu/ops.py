"""The model's small ops on CPU, in strata's C kernels (cpu_ops.c; built with the attention
kernels by strata/kernels/cpu/build.py): the residual add with the RMS norm, SiLU times up,
rotary embedding in place, and the linear layers of a decode batch (bf16 on oneDNN's packed
weight, int4 on strata's packing). Each checks what its kernel needs and returns None (or
False) where it does not apply; the caller then runs torch's ops. strata/kernels/triton/ops.py
is the same on GPUs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from strata.kernels.cpu.build import library


def _ptr(t: torch.Tensor) -> int:
    """A tensor's address for a pointer argument (ctypes takes a plain int)."""
    return t.data_ptr()


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
    lib.add_rms_norm(
        _ptr(delta) if delta is not None else None,
        _ptr(x),
        _ptr(weight),
        _ptr(out),
        x.shape[0],
        x.shape[1],
        eps,
    )
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
    rc = lib.linear_packed_bf16(
        _ptr(x),
        address,
        _ptr(bias) if bias is not None else None,
        _ptr(y),
        rows,
        out_features,
        x.shape[1],
    )
    return y if rc == 0 else None


@functools.cache
def int4_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether strata's int4 kernels run here for rows of dtype: bfloat16 on AVX-512 (with
    BF16) and AMX (cpu_ops.c) or AVX2 (cpu_gemm.c); float32 on AVX2 and up."""
    lib = library()
    if lib is None:
        return False
    if dtype == torch.float32:
        return avx2_linear_available(dtype)
    x = torch.zeros(1, 32, dtype=torch.bfloat16)
    w = torch.zeros(1, 1, 8 * 32 + 64, dtype=torch.uint8)
    y = torch.empty(1, 16, dtype=torch.bfloat16)
    return lib.int4_linear_bf16(_ptr(x), _ptr(w), None, _ptr(y), 1, 16, 32, 32) == 0


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    group: int,
) -> torch.Tensor:
    """x [rows, k] times linear.pack_int4's weight, plus bias: bfloat16 rows rounded to
    bfloat16 once (cpu_ops.c: 1 row AVX512-BF16, 2-16 rows AMX tiles, more rows the weight
    unpacked to bfloat16 for AMX; below AVX-512, cpu_gemm.c's AVX2 kernel), float32 rows on
    the AVX2 kernel. Only where int4_available(x.dtype)."""
    lib = library()
    if x.dtype == torch.float32:
        return linear_avx2(x, packed, W_INT4, bias, out_features)
    if lib is None or x.dtype != torch.bfloat16 or x.dim() != 2:
        raise ValueError(f"int4_linear takes bfloat16 rows on CPU, not {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    y = x.new_empty(x.shape[0], out_features)
    if not len(x):
        return y
    rc = lib.int4_linear_bf16(
        _ptr(x),
        _ptr(packed),
        _ptr(bias) if bias is not None else None,
        _ptr(y),
        x.shape[0],
        out_features,
        x.shape[1],
        group,
    )
    if rc:
        raise RuntimeError(f"int4_linear failed ({rc})")
    return y


# cpu_gemm.c's weight layouts: linear.pack_pairs, linear.pack_int4, linear.pack_int8
W_PAIR_BF16, W_INT4, W_INT8 = 0, 1, 2
_LINEAR_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


@functools.cache
def avx2_linear_available(dtype: torch.dtype) -> bool:
    """Whether cpu_gemm.c's kernels run here (AVX2 and up) for rows of dtype."""
    lib = library()
    if lib is None or dtype not in _LINEAR_DTYPES:
        return False
    x = torch.zeros(1, 32, dtype=dtype)
    w = torch.zeros(16, 32, dtype=torch.bfloat16)
    y = torch.empty(1, 16, dtype=dtype)
    return (
        lib.linear_avx2(
            _LINEAR_DTYPES[dtype], _ptr(x), _ptr(w), W_PAIR_BF16, None, _ptr(y), 1, 16, 32
        )
        == 0
    )


def linear_avx2(
    x: torch.Tensor,
    packed: torch.Tensor,
    kind: int,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """x [rows, k] (float32 or bfloat16) times a weight in one of cpu_gemm.c's layouts (kind:
    W_PAIR_BF16, W_INT4, W_INT8), plus bias (x's dtype): float32 products and sums, rounded
    to x's dtype once. Only where avx2_linear_available(x.dtype)."""
    lib = library()
    if lib is None or x.dtype not in _LINEAR_DTYPES or x.dim() != 2:
        raise ValueError(f"linear_avx2 takes float32 or bfloat16 rows, not {x.dtype}")
    x = x.contiguous()
    y = x.new_empty(x.shape[0], out_features)
    if not len(x):
        return y
    rc = lib.linear_avx2(
        _LINEAR_DTYPES[x.dtype],
        _ptr(x),
        _ptr(packed),
        kind,
        _ptr(bias) if bias is not None else None,
        _ptr(y),
        x.shape[0],
        out_features,
        x.shape[1],
    )
    if rc:
        raise RuntimeError(f"linear_avx2 failed ({rc})")
    return y


class CpuExperts(NamedTuple):
    """What moe_avx2 needs of a layer's experts, gathered once at load."""

    ups: torch.Tensor  # [experts] int64: each expert's gate/up weight's address
    downs: torch.Tensor  # [experts] int64: its down weight's address
    kind: int  # their layout: W_PAIR_BF16 or W_INT4
    inter: int  # the intermediate size
    dtype: torch.dtype  # the rows they take


def moe_avx2(
    x: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    counts: torch.Tensor,
    experts: CpuExperts,
) -> torch.Tensor | None:
    """A mixture of experts' layer in one call (cpu_gemm.c's moe_avx2): x [tokens, hidden]
    (experts.dtype); rows, weights: the (token, expert) pairs sorted by expert, each pair's
    token and routing weight; counts [experts]: pairs per expert. Sums in float32, rounded
    to x's dtype once; None where the kernel does not run."""
    lib = library()
    if lib is None or x.dtype != experts.dtype or x.dim() != 2:
        return None
    ups, downs, kind, inter = experts.ups, experts.downs, experts.kind, experts.inter
    x = x.contiguous()
    out = torch.zeros(x.shape, dtype=torch.float32)
    rows, counts = rows.to(torch.int64).contiguous(), counts.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    rc = lib.moe_avx2(
        _LINEAR_DTYPES[x.dtype],
        _ptr(x),
        x.shape[1],
        inter,
        _ptr(rows),
        _ptr(weights),
        _ptr(counts),
        len(ups),
        _ptr(ups),
        _ptr(downs),
        kind,
        _ptr(out),
    )
    return out.to(x.dtype) if rc == 0 else None


def reset() -> None:
    """Forget what was probed of the kernels (cpu_build.reset; a test may have patched one
    of them over)."""
    for probe in (int4_available, avx2_linear_available):
        getattr(probe, "cache_clear", lambda: None)()


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
