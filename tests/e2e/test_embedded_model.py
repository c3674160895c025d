"""The embedded SmolLM2-135M-Instruct against transformers on the same weights: the checkpoint
transformers itself dequantized from the GGUF file at first start (strata.model.loader
.convert_gguf; loading the GGUF again here took 20 s of every run). The GGUF's own tensor
table is checked against the gguf package below."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strata.batch import SequenceChunk
from strata.config import KVPoolConfig, ModelConfig
from strata.engine.generate import generate
from strata.engine.runner import ModelRunner
from strata.kernels.cpu import ops as cpu_ops
from strata.model.linear import Int4Linear, Int8Linear
from strata.model.loader import embedded_gguf, resolve_checkpoint
from strata.tokenizer import chat_prompt_ids

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "List three uses of a paperclip.",
]


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner.from_config(ModelConfig(dtype="float32"), KVPoolConfig(num_pages=256))


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        resolve_checkpoint(None), dtype=torch.float32
    ).eval()


def hf_greedy(hf, ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """transformers' greedy generate: the new tokens."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    return out[0, len(ids) :].tolist()


def test_embedded_model_logits_match_transformers(runner, hf):
    ids = chat_prompt_ids(runner.tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    pages = runner.pool.alloc(runner.pages_for(len(ids)))
    try:
        ours = runner.forward([SequenceChunk(ids, 0, pages)], all_logits=True)
    finally:
        runner.pool.free(pages)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    # NOTE: float32 rounding: the int4 kernels sum each group of 32 inputs before scaling it,
    # another order than MKL's over the dequantized weights (1.2e-4 at logits up to 28)
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_embedded_model_serves_its_gguf_blocks_as_stored(runner):
    """By default (AVX2 and up) the GGUF's Q4_1 layers run as int4 and its Q8_0 LM head as
    int8, never quantized a second time: the logits above are the dequantized model's."""
    if not cpu_ops.int4_available(torch.float32):
        pytest.skip("strata's int4 kernels need AVX2: the weights are served dequantized")
    model = runner.model
    assert model.quantization == "int4" and isinstance(model.lm_head, Int8Linear)
    for layer in model.layers:
        for lin in (layer.attn.qkv, layer.attn.o_proj, layer.mlp.gate_up, layer.mlp.down):
            assert isinstance(lin, Int4Linear) and lin.strata


def test_gguf_tensor_table_equals_the_gguf_packages():
    """gguf_codes.read_tensors (metadata skipped, not parsed) finds every tensor the gguf
    package's reader does: the same names, types, shapes and bytes."""
    from gguf import GGUFReader

    from strata.model.gguf_codes import BLOCKS, read_tensors

    reader = GGUFReader(str(embedded_gguf()))
    arch, ours = read_tensors(embedded_gguf())
    assert arch == bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert sorted(ours) == sorted(t.name for t in reader.tensors)
    kinds = {name: kind for kind, (name, _, _) in BLOCKS.items()}
    coded = 0
    for t in reader.tensors:
        mine = ours[t.name]
        assert mine.shape == tuple(int(n) for n in t.shape)
        assert mine.kind == (t.tensor_type.name if t.tensor_type.value in BLOCKS else None)
        if mine.kind is not None:
            assert kinds[mine.kind] == t.tensor_type.value
            assert np.array_equal(mine.data, t.data.reshape(-1).view(np.uint8))
            coded += 1
    assert coded == 30 * 7 + 1  # q, k, v, o, gate, up, down of 30 layers, and the head


@pytest.mark.parametrize("prompt", PROMPTS)
def test_embedded_greedy_generation_equals_transformers_generate(runner, hf, prompt):
    ids = chat_prompt_ids(runner.tokenizer, [{"role": "user", "content": prompt}])
    eos = runner.tokenizer.eos_token_id
    free = runner.pool.num_free
    ours = list(generate(runner, ids, 32, stop_ids=(eos,)))
    assert runner.pool.num_free == free
    assert ours == hf_greedy(hf, ids, 32, eos)
    assert len(ours) >= 8


def test_input_logprobs_match_transformers_with_a_cached_prefix(runner, hf):
    from strata.engine.engine import Engine
    from strata.sampling.params import SamplingParams

    engine = Engine(runner)
    ids = chat_prompt_ids(runner.tokenizer, [{"role": "user", "content": PROMPTS[1] * 3}])
    start = len(ids) - 9
    events: list = []
    for _ in range(2):  # the second run finds the prompt cached, up to logprob_start_len
        events.clear()
        params = SamplingParams(max_new_tokens=1, temperature=0, logprob_start_len=start)
        engine.submit(ids, params, events.append)
        engine.run_until_done()
        ours = torch.tensor(events[0].input_logprobs)
        with torch.no_grad():
            logp = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        ref = logp[start - 1 : -1].gather(1, torch.tensor(ids[start:])[:, None]).squeeze(1)
        assert len(ours) == len(ids) - start
        assert (ours - ref).abs().max().item() <= 1e-4
    assert events[-1].usage.cached_tokens > 0
    engine.flush_cache()


def test_jump_forward_skips_steps_and_keeps_output_valid(runner):
    import json

    import jsonschema

    from strata.engine.engine import Engine
    from strata.grammar.constraint import Constraint
    from strata.sampling.params import SamplingParams

    schema = {
        "type": "object",
        "properties": {
            "the_full_name_of_the_person": {"type": "string", "maxLength": 20},
            "the_age_of_the_person_in_years": {"type": "integer", "minimum": 0, "maximum": 99},
            "the_favourite_colour": {"enum": ["red", "green", "blue"]},
        },
        "required": [
            "the_full_name_of_the_person",
            "the_age_of_the_person_in_years",
            "the_favourite_colour",
        ],
    }
    ids = chat_prompt_ids(runner.tokenizer, [{"role": "user", "content": "A person as JSON."}])
    params = SamplingParams(
        max_new_tokens=128, temperature=0, constraint=Constraint.json_schema(schema)
    )
    steps = {}
    for jump in (False, True):
        engine = Engine(runner, enable_cache=False, jump_forward=jump)
        events: list = []
        engine.submit(ids, params, events.append)
        n = 0
        while engine.scheduler.has_work or n == 0:
            engine._drain()
            n += engine.step()
        text = "".join(e.text for e in events)
        assert events[-1].finish_reason == "stop"
        jsonschema.validate(json.loads(text), schema)
        steps[jump] = n
        assert (engine.jump_forward_tokens > 0) == jump
    assert steps[True] < steps[False] * 0.7, steps


def test_ngram_speculation_keeps_transformers_greedy_output(runner, hf):
    from strata.engine.engine import Engine
    from strata.sampling.params import SamplingParams

    ask = {"role": "user", "content": PROMPTS[1]}
    first = chat_prompt_ids(runner.tokenizer, [ask])
    answer = list(generate(runner, first, 40))
    # the same question again: the second answer is drafted from the first
    messages = [ask, {"role": "assistant", "content": runner.tokenizer.decode(answer)}, ask]
    ids = chat_prompt_ids(runner.tokenizer, messages)
    eos = runner.tokenizer.eos_token_id
    engine = Engine(runner, enable_cache=False, draft_tokens=4)
    events: list = []
    engine.submit(ids, SamplingParams(max_new_tokens=40, temperature=0), events.append)
    engine.run_until_done()
    ours = [t for e in events for t in e.token_ids]
    assert ours == hf_greedy(hf, ids, 40, eos)
    assert engine.accepted_tokens > 0 and len(events) < len(ours)  # some steps gave several
    assert runner.pool.num_free == runner.pool.num_pages
