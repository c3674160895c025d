"""Gemma 3 (text): Gemma 2's layer (sqrt(hidden) embeddings, (1 + w) norms, tanh GeGLU,
sandwich norms, query_pre_attn_scalar) with each query and key head RMS-normed before rope
(as Qwen3), no attention soft cap by default, and five sliding-window layers to each global
one (`layer_types`). The window layers rotate with a rope of their own: the
`sliding_attention` entry of rope_parameters (older configs: rope_local_base_freq), unscaled;
the global layers with the `full_attention` entry (rope_theta and rope_scaling before)."""

from __future__ import annotations

from typing import Any

from strata.model.family import Family
from strata.model.models import gemma2, llama
from strata.model.spec import ModelSpec, UnsupportedModelError

LAYER_WEIGHTS = {
    **gemma2.LAYER_WEIGHTS,
    "q_norm": ("self_attn.q_norm.weight",),
    "k_norm": ("self_attn.k_norm.weight",),
}
LOCAL_THETA = 10000.0  # Gemma 3's window layers, where the config does not say


def spec(cfg: dict[str, Any]) -> ModelSpec:
    rope = cfg.get("rope_parameters") or {}
    per_kind = isinstance(rope.get("full_attention"), dict)
    local = dict(rope.get("sliding_attention") or {}) if per_kind else {}
    theta = float(local.pop("rope_theta", cfg.get("rope_local_base_freq", LOCAL_THETA)))
    if local.get("rope_type", "default") != "default":
        raise UnsupportedModelError(
            f"Gemma 3 window layers with rope_type {local['rope_type']!r}: strata runs "
            "unscaled rope there"
        )
    if per_kind:  # the global layers' rope is the spec's own
        cfg = {**cfg, "rope_parameters": rope["full_attention"]}
    out = gemma2.spec(cfg, "gemma3", local_rope_theta=theta)
    if not out.windows:  # the local rope goes with the window layers
        raise UnsupportedModelError("Gemma 3 without a sliding_window is not supported")
    return out


FAMILY = Family(
    "gemma3",
    ("Gemma3ForCausalLM",),
    "gemma3_text",
    spec,
    llama.WEIGHTS,
    LAYER_WEIGHTS,
    norm_offset=1.0,
)
