"""Decoder building blocks: attention with fused QKV, gated MLP with fused gate/up, norms."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from strata.attention.base import AttentionBackend, AttentionMeta
from strata.config import cpu_isa
from strata.kernels.cpu import ops as cpu_ops
from strata.kv.pool import LayerKV
from strata.model.linear import Int4Linear, Int8Linear, Linear
from strata.model.rope import RotaryEmbedding
from strata.model.spec import ModelSpec
from strata.model.tp import TPGroup

AnyLinear = Linear | Int4Linear | Int8Linear


def gpu_ops() -> Any:
    """strata.kernels.triton.ops, imported where a CUDA tensor first needs it (Triton runs on
    CPU tensors only under its interpreter)."""
    from strata.kernels.triton import ops as triton_ops

    return triton_ops


class RMSNorm:
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight = weight
        self.shape = (weight.shape[0],)
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.shape, self.weight, self.eps)

    def add_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)): the residual add and the next norm. bfloat16 on CPU
        runs both in one C call and CUDA in one Triton kernel, each adding in place (x is the
        residual stream, owned by the forward); elsewhere torch's ops, unchanged."""
        fused = cpu_ops.add_rms_norm(x, delta, self.weight, self.eps)
        if fused is not None:
            return x, fused
        if x.is_cuda:  # one Triton kernel, adding in place too
            return x, gpu_ops().add_rms_norm(x, delta, self.weight, self.eps)
        if delta is not None:
            x = x + delta
        return x, self(x)


class Attention:
    def __init__(
        self,
        spec: ModelSpec,
        qkv: AnyLinear,
        o_proj: AnyLinear,
        rope: RotaryEmbedding,
        backend: AttentionBackend,
        tp: TPGroup | None = None,
        qk_norm: tuple[RMSNorm, RMSNorm] | None = None,
    ) -> None:
        """spec: the heads this layer runs (with tp, this rank's share; o_proj's partial
        sums are all-reduced over the ranks). qk_norm: each query and key head normed
        before rope (Qwen3)."""
        self.qkv, self.o_proj, self.rope, self.backend = qkv, o_proj, rope, backend
        self.tp, self.qk_norm = tp, qk_norm
        self.heads, self.kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_size, self.kv_size = spec.q_size, spec.kv_size

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_layer: LayerKV,
        meta: AttentionMeta,
    ) -> torch.Tensor:
        t, qk_size = x.shape[0], self.q_size + self.kv_size
        qkv = self.qkv(x)  # [T, q_size + 2 * kv_size]
        # NOTE: q and k heads are rotated in one call (in place in qkv where the CPU kernel
        # takes it): half the small ops of a decode step.
        qk = qkv[:, :qk_size].view(t, -1, self.head_dim)
        if self.qk_norm is not None:
            q_norm, k_norm = self.qk_norm
            qk = torch.cat([q_norm(qk[:, : self.heads]), k_norm(qk[:, self.heads :])], dim=1)
        if qk.is_cuda:
            gpu_ops().rope_(qk, cos, sin)
        elif not cpu_ops.rope_(qk, cos, sin):
            qk = self.rope.apply(qk, cos, sin)
        q, k = qk[:, : self.heads], qk[:, self.heads :]
        v = qkv[:, qk_size:].view(t, self.kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, kv_layer, meta)
        y = self.o_proj(out.reshape(t, self.q_size))
        return self.tp.all_reduce(y) if self.tp else y


class MLP:
    """down(act(gate) * up), gate and up one fused product; act: "silu" or "gelu_tanh"."""

    def __init__(
        self, gate_up: AnyLinear, down: AnyLinear, tp: TPGroup | None = None, act: str = "silu"
    ) -> None:
        if act not in ("silu", "gelu_tanh"):
            raise ValueError(f"unsupported MLP activation {act!r}")
        self.gate_up, self.down, self.tp, self.act = gate_up, down, tp, act

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        if self.act == "gelu_tanh":
            gate, up = gate_up.chunk(2, dim=-1)
            y = self.down(F.gelu(gate, approximate="tanh") * up)
            return self.tp.all_reduce(y) if self.tp else y
        h = cpu_ops.silu_mul(gate_up)  # bfloat16 on CPU: one call, rounded as torch
        if h is None and gate_up.is_cuda:
            h = gpu_ops().silu_mul(gate_up)
        if h is None:
            gate, up = gate_up.chunk(2, dim=-1)
            h = F.silu(gate) * up
        y = self.down(h)
        return self.tp.all_reduce(y) if self.tp else y


class SparseMoE:
    """A mixture of experts in place of the MLP (Qwen3-MoE): a router picks each token's top
    k experts by softmax probability (renormalised over the k with norm_topk_prob), and the
    tokens run grouped by expert, each group one batched MLP call, its rows weighted and
    added back. Each expert is an MLP of strata's linear layers, so int4 packs them as any.
    stacked: the experts' weights stacked instead ([E, 2 I, H] gate and up, [E, H, I] down),
    run by the Triton kernels (strata.kernels.triton.moe)."""

    def __init__(
        self,
        router: AnyLinear,
        experts: list[MLP],
        top_k: int,
        norm: bool,
        stacked: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.router, self.experts, self.top_k, self.norm = router, experts, top_k, norm
        self.stacked = stacked
        self.fused = fused_cpu_experts(experts)  # the experts in one C call, where it runs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.norm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.stacked is not None:
            from strata.kernels.triton.moe import fused_experts

            return fused_experts(x, chosen, weights, *self.stacked)
        flat = chosen.flatten()
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        rows = order // self.top_k
        counted = torch.bincount(flat, minlength=len(self.experts))
        if self.fused is not None:
            y = cpu_ops.moe_avx2(x, rows, weights.flatten()[order], counted, self.fused)
            if y is not None:
                return y
        weights = weights.to(x.dtype)
        counts = counted.tolist()
        slot_weights = weights.flatten()[order]
        out = torch.zeros_like(x)
        start = 0
        for expert, n in zip(self.experts, counts):
            if n:
                group = rows[start : start + n]
                y = expert(x[group]) * slot_weights[start : start + n, None]
                out.index_add_(0, group, y)
                start += n
        return out


def fused_cpu_experts(experts: list[MLP]) -> cpu_ops.CpuExperts | None:
    """What cpu_ops.moe_avx2 needs of a layer's experts (their gate/up and down weights'
    addresses, their layout, the intermediate size, the rows' dtype), where every expert's
    products run on cpu_gemm.c's AVX2 kernel in one layout (bfloat16 pairs, or strata's int4
    at the avx2 level) with no bias and SiLU; None elsewhere (they run one by one)."""
    if not experts or any(e.act != "silu" or e.tp is not None for e in experts):
        return None
    layouts = {_avx2_layout(lin) for e in experts for lin in (e.gate_up, e.down)}
    layout = layouts.pop() if len(layouts) == 1 else None
    if layout is None:
        return None
    kind, dtype = layout
    ups = torch.tensor([_avx2_weight(e.gate_up).data_ptr() for e in experts], dtype=torch.int64)
    downs = torch.tensor([_avx2_weight(e.down).data_ptr() for e in experts], dtype=torch.int64)
    down = experts[0].down
    inter = down.weight.shape[1] if isinstance(down, Linear) else down.in_features
    return cpu_ops.CpuExperts(ups, downs, kind, inter, dtype)


def _avx2_layout(lin: Any) -> tuple[int, torch.dtype] | None:
    """(cpu_gemm.c's layout, the rows' dtype) of a linear layer that runs on linear_avx2."""
    if getattr(lin, "bias", None) is not None:
        return None
    if isinstance(lin, Linear) and lin.pairs is not None:
        return cpu_ops.W_PAIR_BF16, lin.weight.dtype
    if (
        isinstance(lin, Int4Linear)
        and lin.strata
        and (cpu_isa() == "avx2" or lin.dtype == torch.float32)
    ):
        return cpu_ops.W_INT4, lin.dtype
    return None


def _avx2_weight(lin: Any) -> torch.Tensor:
    weight = lin.pairs if isinstance(lin, Linear) else lin.packed
    assert isinstance(weight, torch.Tensor)
    return weight


class DecoderLayer:
    def __init__(
        self, attn: Attention, mlp: MLP | SparseMoE, norm1: RMSNorm, norm2: RMSNorm
    ) -> None:
        self.attn, self.mlp, self.norm1, self.norm2 = attn, mlp, norm1, norm2

    def __call__(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_layer: LayerKV,
        meta: AttentionMeta,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream, delta: the previous layer's output still to add to it
        (None for the first layer). Returns (residual, this layer's MLP output): the add
        is left to the next norm, which fuses it."""
        x, h = self.norm1.add_norm(x, delta)
        x, h = self.norm2.add_norm(x, self.attn(h, cos, sin, kv_layer, meta))
        return x, self.mlp(h)


class SandwichLayer:
    """A decoder layer whose attention and MLP outputs are normed before they join the
    residual stream, and whose MLP has a norm of its own before it (Gemma 2 and 3)."""

    def __init__(
        self,
        attn: Attention,
        mlp: MLP | SparseMoE,
        norms: tuple[RMSNorm, RMSNorm, RMSNorm, RMSNorm],
    ) -> None:
        """norms: before attention, after it, before the MLP, after it."""
        self.attn, self.mlp = attn, mlp
        self.input_norm, self.post_attn_norm, self.pre_ff_norm, self.post_ff_norm = norms

    def __call__(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_layer: LayerKV,
        meta: AttentionMeta,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DecoderLayer's protocol: the residual, and this layer's output still to add."""
        x, h = self.input_norm.add_norm(x, delta)
        a = self.post_attn_norm(self.attn(h, cos, sin, kv_layer, meta))
        x, h = self.pre_ff_norm.add_norm(x, a)
        return x, self.post_ff_norm(self.mlp(h))
