"""Family: what strata knows of one model family (its file in strata/model/models/): which
checkpoints it takes, how their config maps onto a ModelSpec, how their tensors map onto
strata's fused weights, and the model class that runs them."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from strata.model.loader import ModelLoadError
from strata.model.spec import ModelSpec

if TYPE_CHECKING:  # a gateway reads specs here without torch (2 s a process); a worker
    import torch  # imports the model class (model_class) and torch with it

# strata's fused name -> the checkpoint tensors concatenated (in this order) into it
WeightMap = Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class Family:
    """name: strata's name for it (ModelSpec.architecture); architectures / model_type: the
    config.json values that select it; spec: config.json -> ModelSpec; weights: the model's
    own tensors (`embed_tokens`, `norm`, `lm_head`); layer_weights: each layer's, without the
    `layers.{i}.` prefix (a QKV bias, a router and experts only where the spec has them; a
    name with `{e}` once per expert);
    model: the class run with the fused weights, or "module:Class" to import it only where a
    model loads (model_class; the built-in families, so a gateway reads their specs without
    torch); fused_cpu_decode: the C++ decode layers
    (strata.model.cpu_layers) compute this family's layer, so dense decode may use them;
    norm_offset: the checkpoint's RMSNorm weights apply as (norm_offset + w) (Gemma: 1),
    added in float32 as they load; layout: brings a checkpoint laid out otherwise to the
    hub's tensor names first (e.g. split_fused_experts)."""

    name: str
    architectures: tuple[str, ...]
    model_type: str
    spec: Callable[[dict[str, Any]], ModelSpec]
    weights: WeightMap
    layer_weights: WeightMap
    model: Callable[..., Any] | str = "strata.model.decoder:DecoderLM"
    fused_cpu_decode: bool = False
    norm_offset: float = 0.0
    layout: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None

    def model_class(self) -> Callable[..., Any]:
        if not isinstance(self.model, str):
            return self.model
        module, name = self.model.split(":")
        return getattr(importlib.import_module(module), name)

    def fuse(
        self,
        spec: ModelSpec,
        raw: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: str,
    ) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors in strata's fused layout (qkv, gate_up, ...), in dtype on
        device. Raises ModelLoadError naming a tensor the checkpoint lacks."""
        import torch

        if self.layout is not None:
            raw = self.layout(raw)

        def fused(names: tuple[str, ...]) -> torch.Tensor:
            for n in names:
                if n not in raw:
                    raise ModelLoadError(f"checkpoint lacks tensor {n!r}")
            parts = [raw[n] for n in names]
            t = parts[0] if len(parts) == 1 else torch.cat(parts)
            if self.norm_offset and names[0].endswith("norm.weight"):
                t = t.float() + self.norm_offset
            return t.to(device=device, dtype=dtype).contiguous()

        out = {}
        for ours, theirs in self.weights.items():
            if ours == "lm_head" and spec.tie_word_embeddings:
                continue
            out[ours] = fused(theirs)
        for i in range(spec.num_layers):
            p = f"layers.{i}."
            for ours, theirs in self.layer_weights.items():
                if not _wanted(spec, i, ours):
                    continue
                experts = range(spec.num_experts) if "{e}" in ours else (0,)
                for e in experts:  # "{e}": one tensor of each expert
                    name = p + ours.format(e=e)
                    out[name] = fused(tuple(p + n.format(e=e) for n in theirs))
        return out


def _wanted(spec: ModelSpec, layer: int, ours: str) -> bool:
    """Whether layer has the fused weight ours: QKV biases where the spec has them; the
    router and experts in MoE layers, a dense MLP in the others."""
    if ours == "qkv_bias":
        return spec.qkv_bias
    moe = layer in spec.moe_layers
    if ours == "router" or ours.startswith("experts."):
        return moe
    if ours in ("gate_up", "down"):
        return not moe
    return True


def split_fused_experts(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5 keeps a MoE layer's experts as two stacked tensors (what it saves a
    GGUF file's model as): `mlp.experts.gate_up_proj` [experts, 2 x inter, hidden], gate
    rows first, and `mlp.experts.down_proj` [experts, hidden, inter]; the hub's checkpoints
    name each expert's projections. This renames the former into the latter (views)."""
    out = dict(raw)
    for name in [n for n in raw if n.endswith("mlp.experts.gate_up_proj")]:
        base = name[: -len("gate_up_proj")]
        gate_up, down = out.pop(name), out.pop(base + "down_proj")
        inter = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            out[f"{base}{e}.gate_proj.weight"] = gate_up[e, :inter]
            out[f"{base}{e}.up_proj.weight"] = gate_up[e, inter:]
            out[f"{base}{e}.down_proj.weight"] = down[e]
    return out
