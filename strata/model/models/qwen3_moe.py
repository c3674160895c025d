"""Qwen3-MoE: Qwen3's attention (q and k head norms) with a mixture of experts in place of
the MLP: a router over `num_experts` experts, each token run through its top
`num_experts_per_tok` (their softmax weights renormalised with `norm_topk_prob`), every
`decoder_sparse_step`-th layer not in `mlp_only_layers` (the others keep a dense MLP).
The experts run grouped per step in torch (strata.model.layers.SparseMoE), each expert's
linear layers strata's own (so int4 packs them); no tensor parallelism yet."""

from __future__ import annotations

from typing import Any

from strata.model.family import Family, split_fused_experts
from strata.model.models import llama, qwen3
from strata.model.spec import ModelSpec

LAYER_WEIGHTS = {
    **qwen3.LAYER_WEIGHTS,  # the dense MLP's weights too, for the layers that keep one
    "router": ("mlp.gate.weight",),
    "experts.{e}.gate_up": ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
    "experts.{e}.down": ("mlp.experts.{e}.down_proj.weight",),
}


def spec(cfg: dict[str, Any]) -> ModelSpec:
    # hub configs say num_experts; transformers >= 5 writes num_local_experts
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    layers = cfg["num_hidden_layers"]
    step, dense = int(cfg.get("decoder_sparse_step") or 1), set(cfg.get("mlp_only_layers") or ())
    moe = tuple(i for i in range(layers) if experts and i not in dense and (i + 1) % step == 0)
    return ModelSpec.from_hf(
        cfg,
        "qwen3_moe",
        qkv_bias=bool(cfg.get("attention_bias", False)),
        sliding_window=bool(cfg.get("use_sliding_window", False)),
        num_experts=experts,
        experts_per_token=int(cfg.get("num_experts_per_tok") or 0),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=moe,
    )


FAMILY = Family(
    "qwen3_moe",
    ("Qwen3MoeForCausalLM",),
    "qwen3_moe",
    spec,
    llama.WEIGHTS,
    LAYER_WEIGHTS,
    layout=split_fused_experts,  # a converted GGUF file's experts, as transformers saves them
)
