"""Llama 2 and 3 (SmolLM2, the embedded model, is one): pre-norm decoder, RMSNorm, rotary
embeddings (llama3 scaling too), grouped-query attention, SiLU-gated MLP."""

from __future__ import annotations

from typing import Any

from strata.model.family import Family
from strata.model.spec import ModelSpec

WEIGHTS = {
    "embed_tokens": ("embed_tokens.weight",),
    "norm": ("norm.weight",),
    "lm_head": ("lm_head.weight",),
}
LAYER_WEIGHTS = {
    "qkv": tuple(f"self_attn.{n}_proj.weight" for n in "qkv"),
    "qkv_bias": tuple(f"self_attn.{n}_proj.bias" for n in "qkv"),
    "o_proj": ("self_attn.o_proj.weight",),
    "gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "down": ("mlp.down_proj.weight",),
    "input_norm": ("input_layernorm.weight",),
    "post_norm": ("post_attention_layernorm.weight",),
}


def spec(cfg: dict[str, Any]) -> ModelSpec:
    return ModelSpec.from_hf(cfg, "llama", qkv_bias=bool(cfg.get("attention_bias", False)))


FAMILY = Family(
    "llama",
    ("LlamaForCausalLM",),
    "llama",
    spec,
    WEIGHTS,
    LAYER_WEIGHTS,
    fused_cpu_decode=True,
)
