"""The attention seam: a backend written against strata.attention.base alone, named in one
line of the registry, runs the model through the runner and matches the built-in backends."""

from __future__ import annotations

import pytest
import torch

from strata import config
from strata.attention import reference
from strata.attention.base import AttentionBackend, AttentionMeta
from strata.attention.registry import make_backend
from strata.batch import SequenceChunk
from strata.config import KVPoolConfig, ModelConfig, SparseConfig
from strata.engine.runner import ModelRunner
from strata.kv.pool import LayerKV
from tests.core.test_sparse_attention import decode_logits


class Smallest(AttentionBackend):
    """The smallest backend: the reference ops, one call each."""

    def write_kv(self, layer: LayerKV, where, k: torch.Tensor, v: torch.Tensor) -> None:
        reference.write_kv(layer, where, k, v)

    def prefill(self, q, k, v, layer: LayerKV, meta: AttentionMeta) -> torch.Tensor:
        out = torch.empty_like(q)
        for e in meta.extends:
            r = slice(e.start, e.start + e.q_len)
            out[r] = reference.paged_prefill(
                q[r], k[r], v[r], layer.k, layer.v, e.page_ids, e.prefix_len, self.scale
            )
        return out

    def decode(self, q, layer: LayerKV, meta: AttentionMeta) -> torch.Tensor:
        pages, lens = meta.decode_pages, meta.decode_lens
        mask = torch.arange(pages.shape[1] * self.page_size) < lens[:, None]
        return reference.paged_decode(q, layer.k, layer.v, pages, mask, self.scale)

    def decode_selected(self, q, layer: LayerKV, table, lens) -> torch.Tensor:
        return reference.paged_decode_selected(q, layer.k, layer.v, table, lens, self.scale)


@pytest.fixture
def runners(tiny_checkpoint, monkeypatch):
    """Factory: a runner on one tiny four-layer GQA model with the named backend; the test
    backend registered as "smallest" (its one registry line)."""
    path = f"{__name__}:Smallest"
    monkeypatch.setitem(config.ATTENTION_BACKENDS, "smallest", path)
    folder, _ = tiny_checkpoint("llama", num_hidden_layers=4, num_key_value_heads=2)

    def make(backend: str, sparse: SparseConfig | None = None) -> ModelRunner:
        sparse = sparse or SparseConfig(threshold=0)
        model = ModelConfig(str(folder), dtype="float32", sparse=sparse, attention_backend=backend)
        return ModelRunner.from_config(model, KVPoolConfig(page_size=4, num_pages=128))

    return make


PROMPT = [(i * 37 + 11) % 300 for i in range(70)]
SPARSE = SparseConfig(threshold=0.3, min_context=32, budget=0.5, window_pages=2)


@pytest.mark.parametrize("peer", ["torch", "cpu"])
def test_a_registered_backend_decodes_as_the_built_in_ones(runners, peer):
    """Prefill then greedy decode, dense and sparse: the same logits, the same pages skipped."""
    smallest = runners("smallest")
    assert type(smallest.model.backend) is Smallest
    want, _ = decode_logits(runners(peer), PROMPT, 5)
    got, _ = decode_logits(smallest, PROMPT, 5)
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    want, skipped = decode_logits(runners(peer, SPARSE), PROMPT, 5)
    got, same = decode_logits(runners("smallest", SPARSE), PROMPT, 5)
    assert skipped == same and any(s is not None and s[0][0] > 0 for s in same)
    assert torch.allclose(got, want, atol=1e-4, rtol=0)


def test_a_registered_backend_runs_prefill_and_decode_in_one_forward(runners):
    outs = []
    for backend in ("cpu", "smallest"):
        runner = runners(backend)
        a, b, c = runner.pool.alloc(8), runner.pool.alloc(8), runner.pool.alloc(4)
        runner.forward([SequenceChunk(PROMPT[:13], 0, a), SequenceChunk(PROMPT[:6], 0, b)])
        mixed = [
            SequenceChunk([5], 13, a),
            SequenceChunk(PROMPT[6:20], 6, b),
            SequenceChunk(PROMPT[30:39], 0, c),
        ]
        outs.append(runner.forward(mixed))
    assert torch.allclose(outs[1], outs[0], atol=1e-4, rtol=0)


def test_soft_capped_attention_runs_on_a_backend_that_has_it(monkeypatch):
    """Gemma 2's soft cap: auto keeps the cpu backend (its decode kernel caps the logits),
    which then decodes densely; a backend without the cap is refused by name."""
    from strata.attention.cpu_backend import CpuAttention

    backend = make_backend("auto", "cpu", 0.1, 4, SparseConfig(), softcap=50.0)
    assert type(backend) is CpuAttention and backend.sparse is None
    monkeypatch.setitem(config.ATTENTION_BACKENDS, "smallest", f"{__name__}:Smallest")
    with pytest.raises(ValueError, match="soft-capping"):
        make_backend("smallest", "cpu", 0.1, 4, softcap=50.0)


def test_unknown_and_unloadable_backends_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown attention backend"):
        make_backend("flash", "cpu", 0.1, 4)
    monkeypatch.setitem(config.ATTENTION_BACKENDS, "gone", "strata.attention.no_such:Backend")
    with pytest.raises(ValueError, match="cannot load here"):
        make_backend("gone", "cpu", 0.1, 4)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_cpu_kernels_run_soft_caps_and_windows_as_the_reference(tiny_checkpoint, arch):
    """Gemma 2 (soft caps, every other layer windowed) and Gemma 3 (5 window layers to 1
    global) on pages of 16 (the C prefill kernel's), windows cutting the prompt: the cpu
    backend's prefill and decode logits equal the torch reference backend's."""
    from tests.core.test_model_exact import GEMMA3, GEMMA_CAPS

    more = (
        {**GEMMA_CAPS, "sliding_window": 20}
        if arch == "gemma2"
        else {**GEMMA3, "sliding_window": 20}
    )
    folder, _ = tiny_checkpoint(arch, num_hidden_layers=6, head_dim=16, pad_token_id=0, **more)
    logits = []
    for backend in ("torch", "cpu"):
        model = ModelConfig(str(folder), dtype="float32", attention_backend=backend)
        runner = ModelRunner.from_config(model, KVPoolConfig(page_size=16, num_pages=64))
        logits.append(decode_logits(runner, PROMPT, 4)[0])
    assert torch.allclose(logits[1], logits[0], atol=1e-4, rtol=0)
