"""Mistral: Llama's layer; its sliding window is on unless the config says otherwise (masked
where it cuts: strata.attention.base)."""

from __future__ import annotations

from typing import Any

from strata.model.family import Family
from strata.model.models import llama
from strata.model.spec import ModelSpec


def spec(cfg: dict[str, Any]) -> ModelSpec:
    window = cfg.get("use_sliding_window", True)
    bias = bool(cfg.get("attention_bias", False))
    return ModelSpec.from_hf(cfg, "mistral", qkv_bias=bias, sliding_window=window)


FAMILY = Family(
    "mistral",
    ("MistralForCausalLM",),
    "mistral",
    spec,
    llama.WEIGHTS,
    llama.LAYER_WEIGHTS,
    fused_cpu_decode=True,
)
