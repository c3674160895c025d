"""Qwen2 and Qwen2.5: Llama's layer with biases on q, k and v; its sliding window only where
the config turns it on."""

from __future__ import annotations

from typing import Any

from strata.model.family import Family
from strata.model.models import llama
from strata.model.spec import ModelSpec


def spec(cfg: dict[str, Any]) -> ModelSpec:
    window = cfg.get("use_sliding_window", False)
    return ModelSpec.from_hf(cfg, "qwen2", qkv_bias=True, sliding_window=window)


FAMILY = Family(
    "qwen2",
    ("Qwen2ForCausalLM",),
    "qwen2",
    spec,
    llama.WEIGHTS,
    llama.LAYER_WEIGHTS,
    fused_cpu_decode=True,
)
