"""Qwen3 (dense): Llama's layer with each query and key head RMS-normed before rope, and no
bias on q, k and v. The fused CPU decode layers do not compute the head norms, so dense
decode runs layer by layer."""

from __future__ import annotations

from typing import Any

from strata.model.family import Family
from strata.model.models import llama
from strata.model.spec import ModelSpec

LAYER_WEIGHTS = {
    **llama.LAYER_WEIGHTS,
    "q_norm": ("self_attn.q_norm.weight",),
    "k_norm": ("self_attn.k_norm.weight",),
}


def spec(cfg: dict[str, Any]) -> ModelSpec:
    bias = bool(cfg.get("attention_bias", False))
    window = cfg.get("use_sliding_window", False)
    return ModelSpec.from_hf(cfg, "qwen3", qkv_bias=bias, sliding_window=window)


FAMILY = Family(
    "qwen3",
    ("Qwen3ForCausalLM",),
    "qwen3",
    spec,
    llama.WEIGHTS,
    LAYER_WEIGHTS,
)
