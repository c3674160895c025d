"""ModelSpec: the few numbers of a Hugging Face config that the model runner needs (each
family maps its config onto it: strata.model.models)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_theta: float
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()
    # what some families change (Gemma): the MLP's activation ("silu" or "gelu_tanh"), the
    # softmax scale (None: head_dim ** -0.5), tanh soft-capping of the attention logits and
    # of the final logits (None: none), and the factor on the embeddings
    hidden_act: str = "silu"
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: float = 1.0
    # per layer, the sliding window of its attention in tokens (0: the whole context); ()
    # where no layer has one
    windows: tuple[int, ...] = ()
    # the rope base of the sliding-window layers, unscaled, where it is not the others'
    # (Gemma 3); None: every layer rotates alike
    local_rope_theta: float | None = None
    # mixture of experts (Qwen3-MoE): experts per MoE layer, how many each token takes, each
    # expert's MLP width, whether the chosen experts' weights are renormalised to sum to 1,
    # and which layers are MoE (the others keep a dense MLP of intermediate_size)
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[int, ...] = ()

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(
        cls,
        cfg: dict[str, Any],
        architecture: str,
        qkv_bias: bool = False,
        sliding_window: bool = False,
        **changes: Any,
    ) -> ModelSpec:
        """The Llama-style fields of a parsed config.json (a family's file says which family
        and what differs: strata.model.models). sliding_window: the config's window, if it
        has one, applies (to the layers its `layer_types` names, else to every layer).
        changes: other fields, as the family sets them."""
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        # transformers >= 5 folds rope_theta and rope_scaling into rope_parameters.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope["rope_type"] = rope_type
        if "partial_rotary_factor" in cfg:  # older configs keep it beside, not inside
            rope.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
        max_position = cfg.get("max_position_embeddings", 2048)
        window = int(cfg.get("sliding_window") or 0)
        windows: tuple[int, ...] = ()
        if window and sliding_window:
            kinds = cfg.get("layer_types") or ["sliding_attention"] * cfg["num_hidden_layers"]
            windows = tuple(window if k == "sliding_attention" else 0 for k in kinds)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=architecture,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position=max_position,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            rope_theta=theta,
            rope_scaling=rope,
            eos_token_ids=eos_ids,
            **{"windows": windows if any(windows) else (), **changes},
        )
