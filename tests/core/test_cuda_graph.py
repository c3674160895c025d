"""Decode steps through DecodeGraphs' static buffers equal the eager forward. On CPU the
buffers are run eagerly (capture=False): the padding, the scratch page and the inputs laid
out per bucket are what is checked. On a GPU machine the same test captures and replays:
    STRATA_TEST_DEVICE=cuda TRITON_INTERPRET=0 python -m pytest tests/core/test_cuda_graph.py
"""

from __future__ import annotations

import os

import pytest
import torch

from strata.batch import SequenceChunk
from strata.config import KVPoolConfig, ModelConfig, SparseConfig
from strata.engine.cuda_graph import DecodeGraphs
from strata.engine.runner import ModelRunner

DEVICE = os.environ.get("STRATA_TEST_DEVICE", "cpu")
if DEVICE != "cpu" and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip(f"STRATA_TEST_DEVICE={DEVICE} but torch sees no GPU", allow_module_level=True)
GPU = DEVICE != "cpu"


def runner_of(folder, sparse: SparseConfig) -> ModelRunner:
    backend = "triton" if GPU else "cpu"
    cfg = ModelConfig(
        str(folder),
        dtype="float32",
        device=DEVICE,
        sparse=sparse,
        attention_backend=backend,
        cuda_graph_max_bs=0,
    )
    return ModelRunner.from_config(cfg, KVPoolConfig(page_size=4, num_pages=160))


def test_decode_steps_through_the_graph_buffers_equal_the_eager_forward(tiny_checkpoint):
    """Three sequences of ragged lengths (one at a page boundary) decode 7 steps in bucket
    4 (one padding row) and then, one finished, 2 steps in bucket 2: each step's logits
    equal a second runner's eager forward, so the padding row wrote nowhere but its scratch
    page. A prefill, a batch past the largest bucket and a sparse step do not replay."""
    folder, _ = tiny_checkpoint("llama", num_hidden_layers=3, num_key_value_heads=2)
    sparse = SparseConfig(threshold=0.3, min_context=40, window_pages=2)
    eager, graphed = runner_of(folder, sparse), runner_of(folder, sparse)
    free = graphed.pool.num_free
    graphs = DecodeGraphs(
        graphed.model, graphed.kv, graphed.pool, 4, graphed.pages_for(256), max_bs=5, capture=GPU
    )
    assert graphs.buckets == [1, 2, 4, 5] and graphed.pool.num_free == free - 1
    prompts = [[(i * 7 + j * 3) % 300 for j in range(n)] for i, n in enumerate((3, 8, 17))]
    tables = [(eager.pool.alloc(8), graphed.pool.alloc(8)) for _ in prompts]
    last, lens = [], [len(p) for p in prompts]
    for p, (te, tg) in zip(prompts, tables):
        want = eager.forward([SequenceChunk(p, 0, te)])
        assert not graphs.fits([SequenceChunk(p, 0, tg)])  # a prefill runs eagerly
        torch.testing.assert_close(graphed.forward([SequenceChunk(p, 0, tg)]), want)
        last.append(int(want[0].argmax()))
    for step in range(9):
        live = range(3) if step < 7 else range(1, 3)
        chunks = [SequenceChunk([last[i]], lens[i], tables[i][0]) for i in live]
        want = eager.forward(chunks)
        mine = [SequenceChunk([last[i]], lens[i], tables[i][1]) for i in live]
        assert graphs.fits(mine)
        got = graphs.run(mine)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        for j, i in enumerate(live):
            last[i], lens[i] = int(want[j].argmax()), lens[i] + 1
    assert not graphs.fits([SequenceChunk([1], 3, tables[0][1])] * 6)  # past the buckets
    assert not graphs.fits([SequenceChunk([1], 40, tables[0][1])])  # sparse decode
