"""The embedded SmolLM2-135M-Instruct against transformers loading the same GGUF file."""

from __future__ import annotations

import pytest
import torch

from strata.config import CacheConfig, ModelConfig
from strata.engine.generate import generate
from strata.engine.runner import ModelRunner
from strata.model.batch import SequenceChunk
from strata.model.loader import EMBEDDED_FILE, embedded_gguf
from strata.tokenizer import chat_prompt_ids

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "List three uses of a paperclip.",
]


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner.from_config(ModelConfig(dtype="float32"), CacheConfig(num_pages=256))


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        embedded_gguf().parent, gguf_file=EMBEDDED_FILE, dtype=torch.float32
    ).eval()


def test_embedded_model_logits_match_transformers(runner, hf):
    ids = chat_prompt_ids(runner.tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    pages = runner.pool.alloc(runner.pages_for(len(ids)))
    try:
        ours = runner.forward([SequenceChunk(ids, 0, pages)], all_logits=True)
    finally:
        runner.pool.free(pages)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("prompt", PROMPTS)
def test_embedded_greedy_generation_equals_transformers_generate(runner, hf, prompt):
    ids = chat_prompt_ids(runner.tokenizer, [{"role": "user", "content": prompt}])
    eos = runner.tokenizer.eos_token_id
    free = runner.pool.num_free
    ours = list(generate(runner, ids, 32, stop_ids=(eos,)))
    assert runner.pool.num_free == free
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=eos,
            pad_token_id=eos,
        )  # fmt: skip
    assert ours == out[0, len(ids) :].tolist()
    assert len(ours) >= 8
