"""DecoderLM: a pre-norm decoder over paged KV (Llama's layout: RMSNorm, rotary attention
with fused QKV, SiLU-gated MLP), run by the families whose layer it is (strata.model.models)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from strata.attention.base import AttentionBackend, AttentionMeta
from strata.batch import ForwardBatch
from strata.config import env
from strata.kv.pool import KVCache
from strata.model.cpu_layers import CpuLayers
from strata.model.layers import MLP, Attention, DecoderLayer, RMSNorm, SandwichLayer, SparseMoE
from strata.model.linear import make_linear
from strata.model.rope import RotaryEmbedding
from strata.model.spec import ModelSpec
from strata.model.tp import TPGroup, local_spec


class DecoderLM:
    """Weights come as a dict of fused tensors (Family.fuse); with tensor parallelism (tp),
    this rank's slices of them (tp.shard_weights). fused_cpu_decode: the family's layer is
    the one strata.model.cpu_layers computes, so dense decode may run it in one C++ call."""

    def __init__(
        self,
        spec: ModelSpec,
        weights: dict[str, torch.Tensor],
        backend: AttentionBackend,
        quantization: str = "none",  # "int4" or "none" (resolved: runner.from_config)
        tp: TPGroup | None = None,
        fused_cpu_decode: bool = False,
    ) -> None:
        self.spec, self.tp = spec, tp
        self.local = local_spec(spec, tp.size) if tp else spec  # the heads this rank runs
        self.backend = backend
        self.quantization = quantization
        embed = weights["embed_tokens"]
        dt = embed.dtype
        self.rope = RotaryEmbedding(
            spec.head_dim,
            spec.max_position,
            spec.rope_theta,
            spec.rope_scaling,
            embed.dtype,
            embed.device,
        )
        self.local_rope = None  # the window layers' own (Gemma 3)
        if spec.local_rope_theta is not None:
            self.local_rope = RotaryEmbedding(
                spec.head_dim, spec.max_position, spec.local_rope_theta, {}, dt, embed.device
            )
        self.embed_tokens = embed
        self._has_sandwich = "layers.0.pre_ff_norm" in weights
        self.layers: list[DecoderLayer | SandwichLayer] = []
        for i in range(spec.num_layers):
            w = lambda name: weights[f"layers.{i}.{name}"]  # noqa: B023
            qkv = make_linear(w("qkv"), weights.get(f"layers.{i}.qkv_bias"), quantization, dt)
            qk_norm = None
            if f"layers.{i}.q_norm" in weights:  # Qwen3
                eps = spec.rms_norm_eps
                qk_norm = (RMSNorm(w("q_norm"), eps), RMSNorm(w("k_norm"), eps))
            attn = Attention(
                self.local,
                qkv,
                make_linear(w("o_proj"), None, quantization, dt),
                self.rope,
                backend,
                tp,
                qk_norm,
            )
            mlp = self._mlp(i, w, quantization, dt, tp)
            self.layers.append(self._layer(attn, mlp, w))
        self.norm = RMSNorm(weights["norm"], spec.rms_norm_eps)
        self.lm_head = make_linear(weights.get("lm_head", embed), None, quantization, dt)
        # dense decode-only batches in bfloat16 on CPU: every layer in one C++ call
        self.cpu_layers = CpuLayers.of(self) if fused_cpu_decode else None

    def _mlp(
        self, i: int, w: Any, quantization: str, dt: torch.dtype, tp: TPGroup | None
    ) -> MLP | SparseMoE:
        """Layer i's MLP, or its mixture of experts (the router kept in dt, unquantized)."""
        spec = self.spec

        def mlp(prefix: str, group: TPGroup | None) -> MLP:
            return MLP(
                make_linear(w(f"{prefix}gate_up"), None, quantization, dt),
                make_linear(w(f"{prefix}down"), None, quantization, dt),
                group,
                spec.hidden_act,
            )

        if i not in spec.moe_layers:
            return mlp("", tp)
        router = make_linear(w("router"), None, "none", dt)
        k, norm = spec.experts_per_token, spec.norm_topk_prob
        if quantization == "none" and moe_kernels(w("router").device) == "triton":
            ups = [w(f"experts.{e}.gate_up") for e in range(spec.num_experts)]
            downs = [w(f"experts.{e}.down") for e in range(spec.num_experts)]
            return SparseMoE(router, [], k, norm, (torch.stack(ups), torch.stack(downs)))
        experts = [mlp(f"experts.{e}.", None) for e in range(spec.num_experts)]
        return SparseMoE(router, experts, k, norm)

    def _layer(self, attn: Attention, mlp: MLP | SparseMoE, w: Any) -> DecoderLayer | SandwichLayer:
        """Llama's layer, or Gemma's (norms after attention and around the MLP) where the
        family's weights have them."""
        eps = self.spec.rms_norm_eps
        if self._has_sandwich:
            names = ("input_norm", "post_norm", "pre_ff_norm", "post_ff_norm")
            n1, n2, n3, n4 = (RMSNorm(w(n), eps) for n in names)
            return SandwichLayer(attn, mlp, (n1, n2, n3, n4))
        return DecoderLayer(attn, mlp, RMSNorm(w("input_norm"), eps), RMSNorm(w("post_norm"), eps))

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVCache) -> tuple[torch.Tensor, AttentionMeta]:
        """Logits (float32) for the rows batch.logits_index: [len(logits_index), vocab], and
        the backend's metadata of the batch (backend.sparsity reads it)."""
        meta = self.backend.prepare(batch, kv)
        return self.compute(batch.input_ids, batch.positions, batch.logits_index, kv, meta), meta

    @torch.inference_mode()
    def compute(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        kv: KVCache,
        meta: AttentionMeta,
    ) -> torch.Tensor:
        """The forward over the backend's metadata of the batch: every shape it takes is in
        its tensors' shapes, so a CUDA graph can capture it (strata.engine.cuda_graph)."""
        cos, sin = self.rope.tables(positions)
        tables = [(cos, sin)] * len(self.layers)
        if self.local_rope is not None:
            local = self.local_rope.tables(positions)
            tables = [local if w else (cos, sin) for w in self.spec.windows]
        if self.tp:
            x = self.tp.embed(input_ids, self.embed_tokens)
        else:
            x = F.embedding(input_ids, self.embed_tokens)
        if self.spec.embed_scale != 1.0:  # Gemma: sqrt(hidden), rounded to the model's dtype
            x = x * torch.tensor(self.spec.embed_scale, dtype=x.dtype)
        delta = None
        plan = self.backend.fused_plan(meta)
        if self.cpu_layers is not None and plan is not None:
            delta = self.cpu_layers.run(x, cos, sin, plan, kv)
        if delta is None:
            for layer, kv_layer, (c, s) in zip(self.layers, kv.layers, tables):
                x, delta = layer(x, delta, c, s, kv_layer, meta)
        if delta is not None and rows.shape[0] == x.shape[0]:  # every row (in order) gives logits
            x = self.norm.add_norm(x, delta)[1]  # one C call on CPU: add and norm
        else:
            x = self.norm((x[rows] + delta[rows]) if delta is not None else x[rows])
        logits = self.lm_head(x)
        if self.spec.final_softcap is not None:
            cap = self.spec.final_softcap
            logits = torch.tanh(logits / cap) * cap
        logits = logits.float()
        return self.tp.gather_logits(logits) if self.tp else logits


def moe_kernels(device: torch.device) -> str:
    """How a mixture of experts runs: "triton" (strata.kernels.triton.moe: the experts'
    weights stacked, two kernels a layer) on CUDA, "grouped" (each expert an MLP of strata's
    linear layers, so int4 packs them) elsewhere; STRATA_MOE=triton|grouped forces one (the
    Triton kernels run on CPU under TRITON_INTERPRET=1, for tests)."""
    forced = env("MOE")
    if forced is not None:
        if forced not in ("triton", "grouped"):
            raise ValueError(f"STRATA_MOE must be triton or grouped, not {forced!r}")
        return forced
    return "triton" if device.type == "cuda" else "grouped"
