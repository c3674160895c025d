"""The Triton mixture-of-experts kernels against the grouped torch path (SparseMoE with each
expert an MLP), run on CPU under TRITON_INTERPRET=1 (tests/conftest.py sets it)."""

from __future__ import annotations

import os

import pytest
import torch

from strata.model.layers import MLP, SparseMoE
from strata.model.linear import make_linear

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("the Triton interpreter is off", allow_module_level=True)

from strata.kernels.triton import moe  # noqa: E402


def test_pairs_sort_into_whole_blocks_per_expert():
    chosen = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 4]])  # expert 3: no tokens
    weights = torch.arange(8, dtype=torch.float32).view(4, 2) + 1
    rows, w, experts = moe.sort_pairs(chosen, weights, 5, 4)
    assert rows.shape[0] == w.shape[0] == 4 * experts.shape[0]
    for b, e in enumerate(experts.tolist()):
        slots = rows[4 * b : 4 * b + 4]
        if e < 0:  # past the last run
            assert (slots == -1).all()
            continue
        for r, wt in zip(slots.tolist(), w[4 * b : 4 * b + 4].tolist()):
            if r >= 0:
                k = chosen[r].tolist().index(e)
                assert wt == weights[r, k]
            else:
                assert wt == 0
    got = sorted(
        (int(e), int(r)) for b, e in enumerate(experts) for r in rows[4 * b : 4 * b + 4] if r >= 0
    )
    want = sorted((int(e), t) for t in range(4) for e in chosen[t])
    assert got == want  # every pair once, in its expert's blocks
    assert experts.tolist()[:4] == [0, 1, 2, 4]  # runs in expert order, whole blocks


@pytest.mark.parametrize("tokens", [1, 7, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_experts_equal_the_grouped_experts(tokens, dtype):
    """Hidden and intermediate sizes that are not multiples of the blocks; 5 experts, 2 a
    token, renormalised; a token count below, at and above a block of pairs."""
    torch.manual_seed(tokens)
    hidden, inter, experts = 48, 40, 5
    w_up = torch.randn(experts, 2 * inter, hidden) / hidden**0.5
    w_down = torch.randn(experts, hidden, inter) / inter**0.5
    router = make_linear((torch.randn(experts, hidden) * 3).to(dtype), None, "none", dtype)
    grouped = SparseMoE(
        router,
        [
            MLP(
                make_linear(w_up[e].to(dtype), None, "none", dtype),
                make_linear(w_down[e].to(dtype), None, "none", dtype),
            )
            for e in range(experts)
        ],
        2,
        True,
    )
    fused = SparseMoE(router, [], 2, True, (w_up.to(dtype), w_down.to(dtype)))
    x = torch.randn(tokens, hidden)
    want = grouped(x.to(dtype)).float()
    got = fused(x.to(dtype)).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert got.shape == want.shape and (got - want).abs().max() <= tol


def test_a_moe_model_runs_its_experts_in_the_kernels(tiny_checkpoint, monkeypatch):
    """Qwen3-MoE with STRATA_MOE=triton: the layers hold the experts stacked, and prefill
    and decode logits equal the grouped path's."""
    from strata.config import KVPoolConfig, ModelConfig
    from strata.engine.runner import ModelRunner
    from tests.core.test_model_exact import MOE
    from tests.core.test_sparse_attention import decode_logits

    folder, _ = tiny_checkpoint("qwen3_moe", **MOE, norm_topk_prob=True)
    out = []
    for kernels in ("grouped", "triton"):
        monkeypatch.setenv("STRATA_MOE", kernels)
        cfg = ModelConfig(str(folder), dtype="float32")
        runner = ModelRunner.from_config(cfg, KVPoolConfig(page_size=4, num_pages=64))
        moes = [layer.mlp for layer in runner.model.layers if isinstance(layer.mlp, SparseMoE)]
        assert moes and all((m.stacked is not None) == (kernels == "triton") for m in moes)
        out.append(decode_logits(runner, [(i * 37 + 11) % 300 for i in range(20)], 3)[0])
    assert torch.allclose(out[1], out[0], atol=1e-4, rtol=0)
