"""Phi-3 and Phi-4: Llama's layer, its checkpoints holding q, k and v as one qkv_proj and
gate and up as one gate_up_proj, in the order strata fuses them. Longrope ("su") scaling and
partial rotary embeddings (Phi-3 128k, Phi-4-mini) are refused by name (strata.model.rope).
A sliding window, where the config has one, applies to every layer."""

from __future__ import annotations

from typing import Any

from strata.model.family import Family
from strata.model.models import llama
from strata.model.spec import ModelSpec

LAYER_WEIGHTS = {
    "qkv": ("self_attn.qkv_proj.weight",),
    "o_proj": ("self_attn.o_proj.weight",),
    "gate_up": ("mlp.gate_up_proj.weight",),
    "down": ("mlp.down_proj.weight",),
    "input_norm": ("input_layernorm.weight",),
    "post_norm": ("post_attention_layernorm.weight",),
}


def spec(cfg: dict[str, Any]) -> ModelSpec:
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Phi-3 with hidden_act {cfg['hidden_act']!r}: strata's MLP is SiLU")
    return ModelSpec.from_hf(cfg, "phi3", sliding_window=True)


FAMILY = Family(
    "phi3",
    ("Phi3ForCausalLM",),
    "phi3",
    spec,
    llama.WEIGHTS,
    LAYER_WEIGHTS,
    fused_cpu_decode=True,
)
