"""Triton kernels for the model's small ops on GPUs, each one launch where torch's eager ops
take two to six: rotary embedding in place, the residual add with the RMS norm, and SiLU
times the up projection. A decode step of a small model is bound by its count of kernels,
in a CUDA graph too (strata.engine.cuda_graph), so fewer launches are a faster step.

Each rounds as the torch ops it replaces do (bfloat16 products and sums rounded where
torch rounds them), so the oracle's tolerances hold. As attention.py here: import this only
where Triton runs (CUDA, or CPU tensors under TRITON_INTERPRET=1, as the tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    X,
    Cos,
    Sin,
    s_xt,
    s_xh,
    s_ct,
    heads,
    HALF: tl.constexpr,
    HP: tl.constexpr,
    BH: tl.constexpr,
):
    """Program (token t): every head of t rotated in place, in the rotate-half layout."""
    t = tl.program_id(0)
    h = tl.arange(0, BH)
    i = tl.arange(0, HP)
    im = i < HALF
    m = (h < heads)[:, None] & im[None, :]
    c = tl.load(Cos + t * s_ct + i, mask=im).to(tl.float32)[None, :]
    s = tl.load(Sin + t * s_ct + i, mask=im).to(tl.float32)[None, :]
    at = X + t * s_xt + h[:, None] * s_xh + i[None, :]
    x1 = tl.load(at, mask=m)
    x2 = tl.load(at + HALF, mask=m)
    dt = x1.dtype
    # torch: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to x's dtype
    a1 = (x1.to(tl.float32) * c).to(dt).to(tl.float32)
    b1 = (-x2.to(tl.float32) * s).to(dt).to(tl.float32)
    a2 = (x2.to(tl.float32) * c).to(dt).to(tl.float32)
    b2 = (x1.to(tl.float32) * s).to(dt).to(tl.float32)
    tl.store(at, (a1 + b1).to(dt), mask=m)
    tl.store(at + HALF, (a2 + b2).to(dt), mask=m)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """RotaryEmbedding.apply in place: x [T, heads, head_dim] (channels adjacent), cos and
    sin [T, 1, head_dim] (each half the same, as RotaryEmbedding.tables gives them)."""
    t, heads, d = x.shape
    if t == 0:
        return
    assert x.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride(0) == sin.stride(0)
    half = d // 2
    _rope_kernel[(t,)](
        x,
        cos,
        sin,
        x.stride(0),
        x.stride(1),
        cos.stride(0),
        heads,
        HALF=half,
        HP=triton.next_power_of_2(half),
        BH=triton.next_power_of_2(heads),
    )


@triton.jit
def _add_rms_norm_kernel(
    X, Delta, W, Out, s_x, s_d, s_o, n, eps, ADD: tl.constexpr, BLOCK: tl.constexpr
):
    """Program (row r): x += delta (rounded to x's dtype) in place, then out = rms_norm(x)
    * w: the norm in float32, rounded to x's dtype before the weight, as torch does."""
    r = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(X + r * s_x + i, mask=m, other=0.0)
    if ADD:
        x = x.to(tl.float32) + tl.load(Delta + r * s_d + i, mask=m, other=0.0).to(tl.float32)
        x = x.to(X.dtype.element_ty)
        tl.store(X + r * s_x + i, x, mask=m)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
    y = (xf * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + i, mask=m, other=0.0).to(tl.float32)
    tl.store(Out + r * s_o + i, (y * w).to(Out.dtype.element_ty), mask=m)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """RMSNorm.add_norm: x += delta in place (x [T, n], the residual stream), and the norm
    of the sum, as a new tensor."""
    t, n = x.shape
    out = torch.empty_like(x)
    if t == 0:
        return out
    assert x.stride(-1) == 1 and (delta is None or delta.stride(-1) == 1)
    d = delta if delta is not None else x
    _add_rms_norm_kernel[(t,)](
        x,
        d,
        weight,
        out,
        x.stride(0),
        d.stride(0),
        out.stride(0),
        n,
        eps,
        ADD=delta is not None,
        BLOCK=triton.next_power_of_2(n),
    )
    return out


@triton.jit
def _silu_mul_kernel(GateUp, Out, s_g, s_o, n, BLOCK: tl.constexpr):
    """Program (row r, block c): silu(gate) rounded to the dtype, times up, rounded."""
    r = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    gate = tl.load(GateUp + r * s_g + i, mask=m, other=0.0)
    up = tl.load(GateUp + r * s_g + n + i, mask=m, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(Out + r * s_o + i, (silu * up.to(tl.float32)).to(Out.dtype.element_ty), mask=m)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [T, 2n] (gate first), [T, n]."""
    t, two_n = gate_up.shape
    n = two_n // 2
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    if t == 0:
        return out
    assert gate_up.stride(-1) == 1
    block = min(1024, triton.next_power_of_2(n))
    _silu_mul_kernel[(t, triton.cdiv(n, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block
    )
    return out
