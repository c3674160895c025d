"""Gemma 2: the embeddings scaled by sqrt(hidden), RMSNorm as (1 + w), a GeGLU MLP (tanh
gelu), norms after attention and around the MLP, a softmax scale of
query_pre_attn_scalar ** -0.5, and tanh soft-capping of the attention logits and of the
final logits. Every other layer attends within a sliding window (`layer_types`), masked
where it cuts (strata.attention.base). Soft-capped attention runs on the torch
backend (the C and Triton kernels have no cap), and decodes densely."""

from __future__ import annotations

from typing import Any

from strata.model.family import Family
from strata.model.models import llama
from strata.model.spec import ModelSpec

LAYER_WEIGHTS = {
    "qkv": tuple(f"self_attn.{n}_proj.weight" for n in "qkv"),
    "o_proj": ("self_attn.o_proj.weight",),
    "gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "down": ("mlp.down_proj.weight",),
    "input_norm": ("input_layernorm.weight",),
    "post_norm": ("post_attention_layernorm.weight",),
    "pre_ff_norm": ("pre_feedforward_layernorm.weight",),
    "post_ff_norm": ("post_feedforward_layernorm.weight",),
}
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def spec(cfg: dict[str, Any], architecture: str = "gemma2", **changes: Any) -> ModelSpec:
    """Also Gemma 3's, with its architecture and changes (strata.model.models.gemma3)."""
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ACTIVATIONS:
        raise ValueError(f"Gemma 2 with hidden_activation {act!r}: strata runs tanh gelu only")
    return ModelSpec.from_hf(
        cfg,
        architecture,
        qkv_bias=bool(cfg.get("attention_bias", False)),
        sliding_window=True,
        hidden_act=ACTIVATIONS[act],
        attn_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_softcap=cfg.get("attn_logit_softcapping"),
        final_softcap=cfg.get("final_logit_softcapping"),
        embed_scale=float(cfg["hidden_size"]) ** 0.5,
        **changes,
    )


FAMILY = Family(
    "gemma2",
    ("Gemma2ForCausalLM",),
    "gemma2",
    spec,
    llama.WEIGHTS,
    LAYER_WEIGHTS,
    norm_offset=1.0,
)
