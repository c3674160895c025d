"""Each model family down strata's other paths: int4 weights (bfloat16 activations) and
sparse decode, on a tiny random checkpoint of the family."""

from __future__ import annotations

import pytest
import torch

from strata.batch import SequenceChunk
from strata.config import KVPoolConfig, ModelConfig, SparseConfig
from strata.engine.runner import ModelRunner
from tests.core.test_sparse_attention import PROMPT, decode_logits

GEMMA3_LAYERS = ["sliding_attention"] * 3 + ["full_attention"]  # a global layer in 4
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "phi3": {"pad_token_id": 0},
    "gemma2": {"head_dim": 16, "pad_token_id": 0},
    "gemma3": {"head_dim": 16, "pad_token_id": 0, "layer_types": GEMMA3_LAYERS},
    "qwen3_moe": {
        "head_dim": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
    },
}
PS = 16


def runner(folder, **model) -> ModelRunner:
    model.setdefault("dtype", "float32")
    model.setdefault("sparse", SparseConfig(threshold=0))
    return ModelRunner.from_config(
        ModelConfig(str(folder), **model), KVPoolConfig(page_size=PS, num_pages=128)
    )


def prefill_logits(r: ModelRunner, ids: list[int]) -> torch.Tensor:
    pages = r.pool.alloc(r.pages_for(len(ids)))
    return r.forward([SequenceChunk(ids, 0, pages)], all_logits=True).float()


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_int4_weights_stay_near_the_float_model(tiny_checkpoint, arch):
    """Group-wise int4 (32 weights a group) on random weights: every prompt position's
    logits keep their direction (cosine to the float32 model's, the same tokens fed)."""
    folder, _ = tiny_checkpoint(arch, num_hidden_layers=4, **FAMILIES[arch])
    want = prefill_logits(runner(folder), PROMPT[:40])
    got = prefill_logits(runner(folder, dtype="bfloat16", quantization="int4"), PROMPT[:40])
    assert torch.isfinite(got).all()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.min() >= 0.95 and cos.mean() >= 0.975


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_sparse_decode_keeping_every_page_is_dense_and_pruning_skips(tiny_checkpoint, arch):
    folder, _ = tiny_checkpoint(arch, num_hidden_layers=4, **FAMILIES[arch])
    want, _ = decode_logits(runner(folder), PROMPT, 6)
    if arch == "gemma2":  # soft-capped logits: page bounds do not hold, it decodes densely
        assert runner(folder, sparse=SparseConfig()).model.backend.sparse is None
        return
    keep_all = SparseConfig(threshold=1e-30, budget=1000, min_context=64, window_pages=2)
    got, _ = decode_logits(runner(folder, sparse=keep_all), PROMPT, 6)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    prune = SparseConfig(threshold=0.9, budget=0.5, min_context=64, window_pages=2)
    pruned, sparsity = decode_logits(runner(folder, sparse=prune), PROMPT, 6)
    assert torch.isfinite(pruned).all() and all(s[0][0] > 0 for s in sparsity[1:])
