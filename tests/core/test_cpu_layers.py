"""The fused C++ decoder layers (strata/model/cpu_layers.cpp) against the Python layers they
replace: the same logits, bit for bit, on tiny int4 and bfloat16 models, ragged decode
batches."""

from __future__ import annotations

import pytest
import torch

from strata.batch import SequenceChunk
from strata.config import KVPoolConfig, ModelConfig
from strata.engine.runner import ModelRunner
from strata.kernels.cpu import ops as cpu_ops

PS = 4


def decode_batch(runner, prompts, steps):
    """Prefill each prompt alone, then decode all of them together (greedy): the logits of
    every decode step [steps, batch, vocab]."""
    tables = [runner.pool.alloc(runner.pages_for(len(p) + steps)) for p in prompts]
    last = [
        int(runner.forward([SequenceChunk(p, 0, t)])[0].argmax()) for p, t in zip(prompts, tables)
    ]
    lens = [len(p) for p in prompts]
    out = []
    for _ in range(steps):
        chunks = [SequenceChunk([tok], n, t) for tok, n, t in zip(last, lens, tables)]
        logits = runner.forward(chunks)
        out.append(logits)
        last = logits.argmax(-1).tolist()
        lens = [n + 1 for n in lens]
    for t in tables:
        runner.pool.free(t)
    return torch.stack(out)


@pytest.mark.parametrize("batch", [8, 3, 1])  # int4: 1 row AVX-512, more AMX tiles
# none: bfloat16 weights, oneDNN's packing (AVX-512) or strata's pairs (AVX2)
@pytest.mark.parametrize("quant", ["int4", "int4-aten", "none"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: a bias on the fused QKV
def test_fused_layers_give_the_python_layers_logits(
    tiny_checkpoint, arch, quant, batch, monkeypatch, cpu_isa_level
):
    if quant == "int4-aten":  # ATen's int4 packing, as where strata's int4 kernels can't run
        monkeypatch.setattr(cpu_ops, "int4_available", lambda *a: False)
    folder, _ = tiny_checkpoint(arch, num_hidden_layers=3, num_key_value_heads=2)
    runner = ModelRunner.from_config(
        ModelConfig(str(folder), dtype="bfloat16", quantization=quant.removesuffix("-aten")),
        KVPoolConfig(page_size=PS, num_pages=96),
    )
    model = runner.model
    fused = model.cpu_layers
    if fused is None:  # bf16 weights on neither oneDNN's bfloat16 nor strata's AVX2 kernel
        assert quant == "none" and cpu_isa_level == "none"
        return
    # bfloat16 activations on CPU, one rank: the C++ layers run
    lens = (9, 4, 17, 5, 12, 3, 7, 10)[:batch]
    prompts = [[(i * 7 + j) % 300 + 5 for j in range(n)] for i, n in enumerate(lens)]
    got = decode_batch(runner, prompts, 6)
    assert fused.calls == 6  # every decode step (not the prefills)
    model.cpu_layers = None
    want = decode_batch(runner, prompts, 6)
    model.cpu_layers = fused
    assert torch.isfinite(want).all()
    assert torch.equal(got, want)


def test_fused_layers_stay_out_of_other_models(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    runner = ModelRunner.from_config(
        ModelConfig(str(folder), dtype="float32"), KVPoolConfig(page_size=PS, num_pages=32)
    )
    assert runner.model.cpu_layers is None
