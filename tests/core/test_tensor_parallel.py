"""Tensor parallelism on CPU: two gloo ranks (rank 0 here, rank 1 a process it starts) give
the logits of one rank and of transformers (float32, 1e-4)."""

from __future__ import annotations

import time

import pytest
import torch

from strata.batch import SequenceChunk
from strata.config import HiCacheConfig, KVPoolConfig, ModelConfig, SparseConfig
from strata.engine.engine import Engine
from strata.engine.runner import ModelRunner, RunnerBroken
from strata.model.registry import model_spec
from strata.model.tp import check_tp
from tests.core.test_model_exact import TOL, hf_logits, prompts


def runner(folder, tp: int, **model) -> ModelRunner:
    model.setdefault("sparse", SparseConfig(threshold=0))
    return ModelRunner.from_config(
        ModelConfig(str(folder), dtype="float32", tp_size=tp, **model),
        KVPoolConfig(page_size=4, num_pages=128),
    )


def steps(
    r: ModelRunner, batch: list[list[int]], decode: int, sparsity: list | None = None
) -> list[torch.Tensor]:
    """A ragged batched prefill (every row's logits), then greedy decode steps (sparsity:
    gets each decode step's sparse decode figures)."""
    chunks = [SequenceChunk(p, 0, r.pool.alloc(r.pages_for(len(p) + decode))) for p in batch]
    out = [r.forward(chunks, all_logits=True)]
    ends = torch.tensor([len(p) for p in batch]).cumsum(0) - 1
    nxt = out[0][ends].argmax(-1).tolist()
    for _ in range(decode):
        chunks = [
            SequenceChunk([t], c.prefix_len + len(c.token_ids), c.pages)
            for c, t in zip(chunks, nxt)
        ]
        step = r.run(chunks)
        out.append(step.logits)
        if sparsity is not None:
            sparsity.append(step.sparsity)
        nxt = out[-1].argmax(-1).tolist()
    return out


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("llama", {"vocab_size": 321}),  # a vocabulary that does not split evenly
        ("qwen2", {"tie_word_embeddings": True}),  # QKV biases, tied LM head
        ("qwen3", {"head_dim": 16}),  # head norms: every rank has them whole
        ("phi3", {"pad_token_id": 0}),  # qkv and gate_up fused in the checkpoint
        ("gemma2", {"head_dim": 16, "pad_token_id": 0}),  # soft caps on each rank's slice
        ("mistral", {"sliding_window": 8}),  # windows that cut, on each rank's heads
        # head norms, windows that cut, two ropes
        ("gemma3", {"head_dim": 16, "pad_token_id": 0, "sliding_window": 8}),
    ],
)
def test_two_ranks_give_the_logits_of_one(tiny_checkpoint, arch, overrides):
    folder, hf = tiny_checkpoint(arch, **overrides)
    batch = prompts([7, 19, 1], hf.config.vocab_size)
    one = steps(runner(folder, 1), batch, 4)
    two_ranks = runner(folder, 2)
    assert two_ranks.tp is not None and two_ranks.kv.data.shape[4] == 1  # 1 of 2 KV heads
    two = steps(two_ranks, batch, 4)
    two_ranks.close()
    for a, b in zip(one, two):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= TOL
    start = 0
    for p in batch:  # and the oracle, on the prefill rows
        want = hf_logits(hf, p)
        assert (two[0][start : start + len(p)] - want).abs().max() <= TOL
        start += len(p)


def test_sparse_decode_over_two_ranks_equals_one(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama", num_hidden_layers=4)
    sparse = SparseConfig(threshold=0.3, min_context=32, budget=0.5, window_pages=2)
    batch = prompts([70, 45], 320)
    one = steps(runner(folder, 1, sparse=sparse), batch, 3)
    two_ranks = runner(folder, 2, sparse=sparse)
    figures: list = []
    two = steps(two_ranks, batch, 3, figures)
    assert figures[-1] is not None and figures[-1][0][0] > 0
    two_ranks.close()
    for a, b in zip(one, two):
        assert (a - b).abs().max() <= TOL


def test_a_size_that_does_not_split_the_model_is_refused(tiny_checkpoint):
    spec = model_spec(tiny_checkpoint("llama")[1].config.to_dict())
    check_tp(spec, 2)
    with pytest.raises(ValueError, match=r"--tp-size 3 must divide .*attention heads \(4\)"):
        check_tp(spec, 3)
    with pytest.raises(ValueError, match="tp-size"):
        ModelConfig(tp_size=0)


def test_tiers_with_tensor_parallelism_are_refused(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    r = runner(folder, 2)
    try:
        with pytest.raises(ValueError, match="hierarchical-cache"):
            Engine(r, tiers=HiCacheConfig(enabled=True))
    finally:
        r.close()


def test_a_rank_that_dies_fails_the_next_forward_instead_of_hanging(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    r = runner(folder, 2)
    pages = r.pool.alloc(4)
    r.forward([SequenceChunk([1, 2, 3], 0, pages)])
    r.followers[0].kill()
    r.followers[0].wait(10)
    start = time.monotonic()
    with pytest.raises(RunnerBroken):
        for _ in range(3):  # the broadcast may still land in the socket's buffer
            r.forward([SequenceChunk([4], 3, pages)])
    assert time.monotonic() - start < 30
    runner(folder, 2).close()  # the failed group was left: a new one forms
