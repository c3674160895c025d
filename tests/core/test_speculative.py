"""N-gram speculation: drafts from a sequence's own tokens, verified by the model row by row,
never change a greedy request's output and never leak a page."""

from __future__ import annotations

import pytest
import torch

from strata.batch import SequenceChunk
from strata.engine import ngram
from strata.engine.engine import Engine
from strata.engine.generate import generate
from strata.engine.ngram import NgramDrafter
from strata.engine.runner import ModelRunner
from strata.sampling.params import SamplingParams
from tests.core.test_scheduler import (
    abort_after_steps,
    assert_pool_back_to_cache_only,
    run,
)

PARAMS = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)


def test_drafter_proposes_what_followed_the_latest_longest_match():
    d = NgramDrafter(min_match=2, max_match=3)
    d.extend([1, 2, 3, 9, 2, 3, 7, 8, 5, 2, 3])
    assert d.propose(3) == [7, 8, 5]  # (2, 3) last came before 7 8 5; the tail is not a match
    d.extend([7])
    assert d.propose(2) == [8, 5]  # (2, 3, 7) is the longest match
    d.extend([4])
    assert d.propose(4) == []  # (7, 4) never came before; one token is too short a match
    d.extend([1, 2])
    assert d.propose(4) == [3, 9, 2, 3]  # (4, 1, 2) unseen; (1, 2) did precede 3 9 2 3


def test_drafter_shortens_after_a_rejection_and_grows_after_a_full_accept():
    d = NgramDrafter()
    d.extend([5, 6, 7, 8, 9, 5, 6])
    assert d.propose(4) == [7, 8, 9, 5]
    d.verified(drafted=4, accepted=0)
    assert d.propose(4) == [7]  # one token past what the model kept
    d.verified(drafted=1, accepted=1)
    assert d.propose(4) == [7, 8]


def test_drafter_indexes_a_long_prompts_tail_a_bounded_slice_a_step(monkeypatch):
    monkeypatch.setattr(ngram, "PROMPT_WINDOW", 50)
    monkeypatch.setattr(ngram, "SYNC_TOKENS", 20)
    prompt = [1, 2, 3] + list(range(100, 157)) + [5, 6, 7, 8] + list(range(200, 236))
    output = [5, 6]
    d = NgramDrafter()
    # 52 tokens to index from position 50, 20 a call: no draft until it has caught up
    assert [d.sync(prompt, output) for _ in range(3)] == [False, False, True]
    assert d.propose(2) == [7, 8]
    output += [1, 2]  # (1, 2) came only before the window
    assert d.sync(prompt, output) and d.propose(2) == []


def looping_prompts(n: int) -> list[list[int]]:
    """Prompts that repeat a short pattern: the tiny random model falls into loops on them."""
    return [[20 + (i * 3 + j) % 11 for j in range(30)] for i in range(n)]


def second_turn(runner: ModelRunner) -> list[int]:
    """A prompt that repeats its first turn after the answer: the second answer is drafted
    from the first from its first token."""
    first = looping_prompts(1)[0]
    return first + list(generate(runner, first, 40)) + first


def test_greedy_output_is_the_same_with_drafts_some_kept_some_not(runner_factory):
    runner = runner_factory(256)
    prompts = looping_prompts(5)
    expected = [list(generate(runner, p, PARAMS.max_new_tokens)) for p in prompts]
    engine = Engine(runner, draft_tokens=4)
    assert run(engine, prompts, PARAMS) == expected
    assert 0 < engine.accepted_tokens < engine.draft_tokens  # both paths ran
    assert_pool_back_to_cache_only(engine)


def test_a_stop_token_anywhere_in_a_draft_ends_the_output_there(runner_factory):
    runner = runner_factory(256)
    prompt = second_turn(runner)
    free = list(generate(runner, prompt, PARAMS.max_new_tokens))
    engine = Engine(runner, draft_tokens=4)
    for stop in dict.fromkeys(free):  # every distinct token, in order of first appearance
        params = SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=(stop,))
        assert run(engine, [prompt], params) == [free[: free.index(stop) + 1]]
        assert_pool_back_to_cache_only(engine)
    assert engine.accepted_tokens > len(free)


def test_drafts_under_page_pressure_and_preemption_keep_the_output(runner_factory):
    prompts = looping_prompts(6)
    reference = runner_factory(256)
    expected = [list(generate(reference, p, PARAMS.max_new_tokens)) for p in prompts]
    engine = Engine(runner_factory(24), max_batch_tokens=64, draft_tokens=4)
    assert run(engine, prompts, PARAMS) == expected
    assert engine.scheduler.preemptions > 0 and engine.accepted_tokens > 0
    assert_pool_back_to_cache_only(engine)


def test_drafts_fill_a_step_up_to_its_row_budget(runner_factory):
    runner = runner_factory(256)
    engine = Engine(runner, draft_tokens=4)
    engine.scheduler.draft_rows = 6  # four requests decoding leave two rows for drafts
    rows: list[int] = []
    forward = runner.run

    def counting(chunks, all_logits=False):
        rows.append(sum(c.logit_rows for c in chunks))
        return forward(chunks, all_logits)

    runner.run = counting  # type: ignore[method-assign]
    prompt = second_turn(runner)
    assert run(engine, [prompt] * 4, PARAMS) == [list(generate(runner, prompt, 40))] * 4
    assert max(rows) == 6 and engine.accepted_tokens > 0


def test_abort_while_drafting_frees_every_page(runner_factory):
    runner = runner_factory(256)
    engine, prompt = Engine(runner, draft_tokens=4), second_turn(runner)
    for steps_before_abort in range(1, 10, 2):
        abort_after_steps(engine, prompt, PARAMS, steps_before_abort)
    assert engine.draft_tokens > 0


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=30, temperature=0.7, seed=1),
        SamplingParams(max_new_tokens=30, temperature=0, repetition_penalty=1.3),
        SamplingParams(max_new_tokens=30, temperature=0, logprobs=True),
        SamplingParams(max_new_tokens=30, temperature=0, logit_bias=((25, 2.0),)),
    ],
    ids=["sampled", "penalized", "logprobs", "logit_bias"],
)
def test_requests_that_pick_by_more_than_argmax_never_draft(runner_factory, params):
    runner = runner_factory(256)
    plain = run(Engine(runner, draft_tokens=0), looping_prompts(2), params)
    engine = Engine(runner, draft_tokens=4)
    assert run(engine, looping_prompts(2), params) == plain
    assert engine.draft_tokens == 0


def test_a_chunk_of_logit_rows_attends_as_its_decode_steps_would(runner_factory):
    """The forward of a verified draft: each of its rows sees the keys up to its own, and
    gives the logits the plain decode step of that token gives."""
    runner = runner_factory(256)
    prompt, extra = looping_prompts(1)[0], [31, 22, 25, 40, 7]
    pages = runner.pool.alloc(runner.pages_for(len(prompt) + len(extra)))
    try:
        runner.forward([SequenceChunk(prompt, 0, pages)])
        steps = [
            runner.forward([SequenceChunk([t], len(prompt) + i, pages)])[0]
            for i, t in enumerate(extra)
        ]
        rows = runner.forward([SequenceChunk(extra, len(prompt), pages, logit_rows=len(extra))])
    finally:
        runner.pool.free(pages)
    assert rows.shape[0] == len(extra)
    torch.testing.assert_close(rows, torch.stack(steps), rtol=0, atol=1e-5)
