"""Plain generation loops over the ModelRunner (the CLI and the decode benchmark use them)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from strata.batch import SequenceChunk
from strata.engine.runner import ModelRunner
from strata.sampling.params import SamplingParams
from strata.sampling.sampler import SampleInput, argmax_rows, sample


def generate(
    runner: ModelRunner,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    stop_ids: Sequence[int] = (),
    seed: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time; the pages are freed however the loop ends."""
    runner.check_length(len(prompt_ids), max_new_tokens)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    outputs: list[int] = []
    pages = runner.pool.alloc(runner.pages_for(len(prompt_ids) + 1))
    try:
        chunk = SequenceChunk(list(prompt_ids), 0, pages)
        length = len(prompt_ids)
        for _ in range(max_new_tokens):
            logits = runner.forward([chunk])
            token = sample(logits, [SampleInput(params, prompt_ids, outputs, gen)]).tokens[0]
            outputs.append(token)
            yield token
            if token in stop_ids:
                return
            length += 1
            if runner.pages_for(length + 1) > len(pages):
                pages.extend(runner.pool.alloc(1))
            chunk = SequenceChunk([token], length - 1, pages)
    finally:
        runner.pool.free(pages)


def generate_greedy_batch(
    runner: ModelRunner, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy, lock-step: one batched prefill, then batched decode steps for every prompt."""
    for p in prompts:
        runner.check_length(len(p), max_new_tokens)
    tables = [runner.pool.alloc(runner.pages_for(len(p) + max_new_tokens)) for p in prompts]
    try:
        chunks = [SequenceChunk(list(p), 0, t) for p, t in zip(prompts, tables)]
        outputs: list[list[int]] = [[] for _ in prompts]
        for _ in range(max_new_tokens):
            tokens = argmax_rows(runner.forward(chunks)).tolist()
            for out, t in zip(outputs, tokens):
                out.append(t)
            chunks = [
                SequenceChunk([t], c.prefix_len + len(c.token_ids), c.pages)
                for c, t in zip(chunks, tokens)
            ]
        return outputs
    finally:
        for t in tables:
            runner.pool.free(t)
