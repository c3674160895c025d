"""strata's model against transformers on the same weights (float32, max abs diff 1e-4)."""

from __future__ import annotations

import pytest
import torch

from strata.batch import SequenceChunk
from strata.config import KVPoolConfig, ModelConfig
from strata.engine.runner import ModelRunner
from strata.kernels.cpu import attention as cpu_kernels

TOL = 1e-4
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# caps small enough to bend a tiny random model's logits (Gemma 2's own are 50 and 30): without
# the attention cap the logits move by 2e-3, past the tolerance
GEMMA_CAPS = {"attn_logit_softcapping": 0.05, "final_logit_softcapping": 1.5}
# a window shorter than the prompts; rope bases far apart, so a layer rotated with the other's
# table is off (Gemma 3's own: 10k and 1M, with 8x linear scaling for the global layers)
GEMMA3 = {
    "sliding_window": 8,
    "query_pre_attn_scalar": 24,
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
    },
}
MOE = {"head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
FAMILIES = [
    ("llama", {}),
    ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0, "tie_word_embeddings": True}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("qwen2", {}),
    ("mistral", {"sliding_window": None}),
    ("qwen3", {"head_dim": 16}),  # head norms on q and k
    ("phi3", {"pad_token_id": 0}),  # q, k, v and gate, up fused in the checkpoint
    # sandwich norms, (1 + w) norms, tanh gelu, soft caps, a scale of its own
    ("gemma2", {"head_dim": 16, "query_pre_attn_scalar": 24, "pad_token_id": 0, **GEMMA_CAPS}),
    # sliding windows shorter than the prompts: on every layer, on the layers layer_types
    # names (Qwen2 past max_window_layers; Gemma 2 every other one)
    ("mistral", {"sliding_window": 8}),
    ("phi3", {"pad_token_id": 0, "sliding_window": 6}),
    ("qwen2", {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 1}),
    ("gemma2", {"head_dim": 16, "pad_token_id": 0, "sliding_window": 8, **GEMMA_CAPS}),
    # q and k head norms, 5 window layers : 1 global, the window layers' rope of their own
    ("gemma3", {"head_dim": 16, "pad_token_id": 0, "num_hidden_layers": 6, **GEMMA3}),
    # a mixture of experts: top 2 of 8 renormalised, a dense layer after it; then top 3 of
    # 4 as softmax gives them, every layer
    ("qwen3_moe", {**MOE, "mlp_only_layers": [1], "norm_topk_prob": True}),
    ("qwen3_moe", {**MOE, "num_experts": 4, "num_experts_per_tok": 3}),
]


def _ids(arch):
    window = f"-window{arch[1]['sliding_window']}" if arch[1].get("sliding_window") else ""
    if arch[1].get("num_experts"):
        window += f"-top{arch[1]['num_experts_per_tok']}of{arch[1]['num_experts']}"
    return f"{arch[0]}-{arch[1].get('rope_scaling', {}).get('rope_type', 'default')}{window}"


@pytest.fixture(params=FAMILIES, ids=_ids)
def pair(request, tiny_checkpoint):
    arch, overrides = request.param
    folder, hf = tiny_checkpoint(arch, **overrides)
    runner = ModelRunner.from_config(
        ModelConfig(str(folder), dtype="float32"), KVPoolConfig(page_size=4, num_pages=256)
    )
    return runner, hf


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def prompts(lengths: list[int], vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def test_ragged_batched_prefill_matches_transformers(pair):
    runner, hf = pair
    batch = prompts([5, 17, 1, 33], runner.spec.vocab_size)
    chunks = [SequenceChunk(p, 0, runner.pool.alloc(runner.pages_for(len(p)))) for p in batch]
    logits = runner.forward(chunks, all_logits=True)
    start = 0
    for p in batch:
        ours = logits[start : start + len(p)]
        assert (ours - hf_logits(hf, p)).abs().max().item() <= TOL
        start += len(p)


@pytest.mark.parametrize("prefix_len", [4, 7, 16])
def test_prefill_on_cached_prefix_matches_transformers(pair, prefix_len):
    runner, hf = pair
    (full,) = prompts([29], runner.spec.vocab_size, seed=prefix_len)
    pages = runner.pool.alloc(runner.pages_for(len(full)))
    runner.forward([SequenceChunk(full[:prefix_len], 0, pages)])
    # a second sequence in the same batch starts cold, so cached and cold prefill mix
    (other,) = prompts([9], runner.spec.vocab_size, seed=99)
    other_pages = runner.pool.alloc(runner.pages_for(len(other)))
    logits = runner.forward(
        [SequenceChunk(full[prefix_len:], prefix_len, pages), SequenceChunk(other, 0, other_pages)],
        all_logits=True,
    )
    suffix = len(full) - prefix_len
    assert (logits[:suffix] - hf_logits(hf, full)[prefix_len:]).abs().max().item() <= TOL
    assert (logits[suffix:] - hf_logits(hf, other)).abs().max().item() <= TOL


def test_32_batched_decode_steps_match_transformers(pair):
    runner, hf = pair
    steps = 32
    batch = prompts([3, 11, 20], runner.spec.vocab_size, seed=5)
    futures = prompts([steps] * 3, runner.spec.vocab_size, seed=6)
    refs = [hf_logits(hf, p + f) for p, f in zip(batch, futures)]
    tables = [runner.pool.alloc(runner.pages_for(len(p) + steps)) for p in batch]
    chunks = [SequenceChunk(p, 0, t) for p, t in zip(batch, tables)]
    logits = runner.forward(chunks)
    for step in range(steps):
        for i, p in enumerate(batch):
            ref = refs[i][len(p) - 1 + step]
            assert (logits[i] - ref).abs().max().item() <= TOL, f"step {step} seq {i}"
        chunks = [
            SequenceChunk([futures[i][step]], len(batch[i]) + step, tables[i])
            for i in range(len(batch))
        ]
        logits = runner.forward(chunks)


def test_decode_and_prefill_mixed_in_one_forward(pair):
    runner, hf = pair
    a, b = prompts([10, 13], runner.spec.vocab_size, seed=7)
    pa = runner.pool.alloc(runner.pages_for(len(a) + 1))
    runner.forward([SequenceChunk(a, 0, pa)])
    pb = runner.pool.alloc(runner.pages_for(len(b)))
    logits = runner.forward([SequenceChunk([42], len(a), pa), SequenceChunk(b, 0, pb)])
    assert (logits[0] - hf_logits(hf, a + [42])[-1]).abs().max().item() <= TOL
    assert (logits[1] - hf_logits(hf, b)[-1]).abs().max().item() <= TOL


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "torch-cascade"])
def test_decode_over_shared_prefix_pages_matches_transformers(pair, kernel, monkeypatch):
    """Sequences that share physical prefix pages (as the radix cache makes them) take the
    CPU decode kernel, or without it the cascade decode path; logits match transformers."""
    if kernel:
        assert cpu_kernels.library() is not None
    else:
        monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    runner, hf = pair
    (prefix,) = prompts([12], runner.spec.vocab_size, seed=11)
    shared = runner.pool.alloc(3)  # 12 tokens = 3 whole pages of 4
    runner.forward([SequenceChunk(prefix, 0, shared)])
    tails = prompts([2, 5, 3], runner.spec.vocab_size, seed=12)
    nexts = prompts([6, 6, 6], runner.spec.vocab_size, seed=13)
    tables = [shared + runner.pool.alloc(4) for _ in tails]
    runner.forward([SequenceChunk(t, len(prefix), tb) for t, tb in zip(tails, tables)])
    for step in range(6):
        chunks = [
            SequenceChunk([nexts[i][step]], len(prefix) + len(tails[i]) + step, tables[i])
            for i in range(3)
        ]
        logits = runner.forward(chunks)
        for i in range(3):
            seq = prefix + tails[i] + nexts[i][: step + 1]
            assert (logits[i] - hf_logits(hf, seq)[-1]).abs().max().item() <= TOL
