"""The model seam: a family is one module with its config mapping and weight-name map, named
in one line of the registry. Proved with a family whose checkpoints name every tensor their
own way (and that does not declare the fused CPU decode layers): its logits are the
transformers model's whose weights it renamed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from strata.batch import SequenceChunk
from strata.config import KVPoolConfig, ModelConfig
from strata.engine.runner import ModelRunner
from strata.model import registry
from strata.model.decoder import DecoderLM
from strata.model.family import Family
from strata.model.spec import ModelSpec, UnsupportedModelError

# strata's fused name -> this family's checkpoint names
WEIGHTS = {"embed_tokens": ("tok.weight",), "norm": ("final.weight",), "lm_head": ("out.weight",)}
LAYER_WEIGHTS = {
    "qkv": ("attn.wq", "attn.wk", "attn.wv"),
    "o_proj": ("attn.wo",),
    "gate_up": ("ffn.w1", "ffn.w3"),
    "down": ("ffn.w2",),
    "input_norm": ("attn_norm",),
    "post_norm": ("ffn_norm",),
}
FAMILY = Family(
    "renamed",
    ("RenamedForCausalLM",),
    "renamed",
    lambda cfg: ModelSpec.from_hf(cfg, "renamed"),
    WEIGHTS,
    LAYER_WEIGHTS,
    DecoderLM,
)
# Llama's names for the same tensors (as transformers saves them, "model." dropped)
HF_NAMES = {
    "tok.weight": "embed_tokens.weight",
    "final.weight": "norm.weight",
    "out.weight": "lm_head.weight",
}
HF_LAYER_NAMES = {
    "attn.wq": "self_attn.q_proj.weight",
    "attn.wk": "self_attn.k_proj.weight",
    "attn.wv": "self_attn.v_proj.weight",
    "attn.wo": "self_attn.o_proj.weight",
    "ffn.w1": "mlp.gate_proj.weight",
    "ffn.w3": "mlp.up_proj.weight",
    "ffn.w2": "mlp.down_proj.weight",
    "attn_norm": "input_layernorm.weight",
    "ffn_norm": "post_attention_layernorm.weight",
}


@pytest.fixture
def registered(monkeypatch):
    """The family above, added to the registry by its one line."""
    monkeypatch.setattr(registry, "FAMILIES", (*registry.FAMILIES, __name__))
    registry.families.cache_clear()
    yield
    registry.families.cache_clear()


def renamed_checkpoint(tmp_path, hf) -> str:
    """A tiny Llama's weights saved under the renamed family's names."""
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    out = {ours: state[theirs] for ours, theirs in HF_NAMES.items()}
    for i in range(hf.config.num_hidden_layers):
        for ours, theirs in HF_LAYER_NAMES.items():
            out[f"layers.{i}.{ours}"] = state[f"layers.{i}.{theirs}"]
    save_file({k: v.contiguous() for k, v in out.items()}, str(tmp_path / "model.safetensors"))
    cfg = {**hf.config.to_dict(), "architectures": ["RenamedForCausalLM"], "model_type": "renamed"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def test_a_registered_family_loads_its_own_names_and_matches_transformers(
    tiny_checkpoint, tmp_path, registered
):
    _, hf = tiny_checkpoint("llama")
    folder = renamed_checkpoint(tmp_path, hf)
    runner = ModelRunner.from_config(
        ModelConfig(folder, dtype="float32"), KVPoolConfig(page_size=4, num_pages=64)
    )
    assert runner.model.spec.architecture == "renamed"
    assert runner.model.cpu_layers is None  # the family did not declare the fused layers
    ids = [(i * 7 + 3) % hf.config.vocab_size for i in range(11)]
    pages = runner.pool.alloc(runner.pages_for(len(ids)))
    got = runner.forward([SequenceChunk(ids, 0, pages)])[0]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0, -1].float()
    assert torch.allclose(got, want, atol=1e-4, rtol=0)


def test_an_unregistered_family_is_refused_by_name(tiny_checkpoint, tmp_path):
    _, hf = tiny_checkpoint("llama")
    folder = renamed_checkpoint(tmp_path, hf)
    with pytest.raises(UnsupportedModelError, match="RenamedForCausalLM"):
        ModelRunner.from_config(
            ModelConfig(folder, dtype="float32"), KVPoolConfig(page_size=4, num_pages=64)
        )


def test_every_built_in_family_is_found_by_architecture_and_by_model_type():
    for arch, kind, name in (
        ("LlamaForCausalLM", "llama", "llama"),
        ("MistralForCausalLM", "mistral", "mistral"),
        ("Qwen2ForCausalLM", "qwen2", "qwen2"),
        ("Qwen3ForCausalLM", "qwen3", "qwen3"),
        ("Phi3ForCausalLM", "phi3", "phi3"),
        ("Gemma2ForCausalLM", "gemma2", "gemma2"),
        ("Gemma3ForCausalLM", "gemma3_text", "gemma3"),
        ("Qwen3MoeForCausalLM", "qwen3_moe", "qwen3_moe"),
    ):
        assert registry.family_of({"architectures": [arch]}).name == name
        assert registry.family_of({"model_type": kind}).name == name


def test_gemma3_maps_its_two_ropes_and_refuses_what_it_cannot_run():
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(num_hidden_layers=6, sliding_window=8, head_dim=16).to_dict()
    spec = registry.model_spec(cfg)
    assert spec.windows == (8, 8, 8, 8, 8, 0)  # five window layers to one global
    assert (spec.rope_theta, spec.local_rope_theta) == (1e6, 1e4)
    old = {k: v for k, v in cfg.items() if k != "rope_parameters"}  # configs before v5
    old.update(rope_theta=5e5, rope_local_base_freq=123.0, rope_scaling=None)
    spec = registry.model_spec(old)
    assert (spec.rope_theta, spec.local_rope_theta) == (5e5, 123.0)
    scaled = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    bad = {**cfg, "rope_parameters": {**cfg["rope_parameters"], "sliding_attention": scaled}}
    with pytest.raises(UnsupportedModelError, match="window layers with rope_type 'linear'"):
        registry.model_spec(bad)
    with pytest.raises(UnsupportedModelError, match="without a sliding_window"):
        registry.model_spec({**cfg, "sliding_window": None})
    with pytest.raises(UnsupportedModelError, match="Gemma3ForConditionalGeneration"):
        registry.model_spec({"architectures": ["Gemma3ForConditionalGeneration"]})


def test_qwen3_moe_maps_its_experts_and_refuses_tensor_parallelism():
    from transformers import Qwen3MoeConfig

    from strata.model.tp import check_tp

    cfg = Qwen3MoeConfig(
        num_hidden_layers=4, num_experts=8, decoder_sparse_step=2, mlp_only_layers=[3]
    ).to_dict()
    spec = registry.model_spec(cfg)
    assert spec.moe_layers == (1,)  # every 2nd layer, less the dense-only ones
    assert (spec.num_experts, spec.experts_per_token) == (8, cfg["num_experts_per_tok"])
    hub = {k: v for k, v in cfg.items() if k != "num_local_experts"} | {"num_experts": 8}
    assert registry.model_spec(hub).num_experts == 8  # the hub's key, before transformers 5
    with pytest.raises(ValueError, match="tensor parallelism"):
        check_tp(spec, 2)
