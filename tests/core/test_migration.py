"""Request migration in the engine: a request resumed after the tokens another engine
streamed (Checked.resume_ids) emits exactly what the uncut run emitted after them: the same
tokens and the same text, greedy, seeded sampling, stop strings and under a grammar."""

from __future__ import annotations

from dataclasses import replace

import pytest

from strata.engine.engine import Engine
from strata.engine.request import RequestOutput
from strata.grammar.constraint import Constraint
from strata.model.loader import load_tokenizer, resolve_checkpoint
from strata.sampling.params import SamplingParams

PROMPT = [50, 51, 52, 53, 60, 61, 62, 63, 70, 71, 72]
CASES = {
    "greedy": SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True),
    "seeded": SamplingParams(max_new_tokens=20, temperature=1.0, seed=7, ignore_eos=True),
    "regex": SamplingParams(
        max_new_tokens=20, temperature=1.0, seed=3, constraint=Constraint("regex", "[a-z]{4,12}")
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_checkpoint(None))


def events_of(engine: Engine, checked) -> list[RequestOutput]:
    events: list[RequestOutput] = []
    engine.intake.queue(checked, events.append)
    engine.run_until_done()
    assert events[-1].finish_reason is not None
    return events


def engine_with_text(runner_factory, tokenizer) -> Engine:
    runner = runner_factory(64)
    runner.tokenizer = tokenizer  # real text: detokenizer, stop strings, grammar
    return Engine(runner, enable_cache=False)


def check_resumes(engine: Engine, params: SamplingParams) -> list[RequestOutput]:
    """Cut the uncut run after its first, middle and next-to-last event: each resumed run
    emits what the uncut one emitted after the cut. Returns the uncut run's events."""
    uncut = events_of(engine, engine.validate(PROMPT, params))
    tokens = [t for e in uncut for t in e.token_ids]
    assert len(uncut) >= 3
    for cut in sorted({0, len(uncut) // 2, len(uncut) - 2}):
        sent = [t for e in uncut[: cut + 1] for t in e.token_ids]
        checked = engine.validate(PROMPT + sent, params).resumed(len(PROMPT))
        rest = events_of(engine, checked)
        assert [t for e in rest for t in e.token_ids] == tokens[len(sent) :], cut
        assert "".join(e.text for e in rest) == "".join(e.text for e in uncut[cut + 1 :]), cut
        assert rest[-1].finish_reason == uncut[-1].finish_reason
        usage = rest[-1].usage
        assert usage is not None and usage.prompt_tokens == len(PROMPT)
        assert usage.completion_tokens == len(tokens)
    assert engine.runner.pool.num_free == engine.runner.pool.num_pages
    return uncut


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_resumed_request_goes_on_exactly_as_the_uncut_one(runner_factory, tokenizer, case):
    check_resumes(engine_with_text(runner_factory, tokenizer), CASES[case])


def test_a_stop_string_held_back_at_the_cut_is_replayed(runner_factory, tokenizer):
    """A stop string whose first character ends the middle event: the stream holds that
    character back there, and the resumed run must hold it too (then stop, or send it)."""
    engine = engine_with_text(runner_factory, tokenizer)
    free = check_resumes(engine, CASES["greedy"])
    ends = [len("".join(e.text for e in free[: i + 1])) for i in range(len(free))]
    text = "".join(e.text for e in free)
    middle = next(ends[i] for i in range(len(free) // 2, len(free)) if ends[i] + 2 <= len(text))
    stop = text[middle - 1 : middle + 2]
    uncut = check_resumes(engine, replace(CASES["greedy"], stop=[stop]))
    assert uncut[-1].finish_reason == "stop"
    assert "".join(e.text for e in uncut) == text[: text.index(stop)]


def test_resumed_tokens_are_checked(runner_factory, tokenizer):
    engine = engine_with_text(runner_factory, tokenizer)
    params = SamplingParams(max_new_tokens=4, temperature=0)
    with pytest.raises(ValueError, match="leave none"):
        engine.validate(PROMPT + [1, 2, 3, 4], params).resumed(len(PROMPT))
    with pytest.raises(ValueError, match="vocabulary|out of range|token"):
        engine.validate(PROMPT + [10**6], params)
    regex = SamplingParams(max_new_tokens=8, constraint=Constraint("regex", "[0-9]+"))
    letters = [t for c in "abc" for t in tokenizer.encode(c, add_special_tokens=False)]
    checked = engine.validate(PROMPT + letters, regex).resumed(len(PROMPT))
    with pytest.raises(ValueError, match="grammar"):
        engine.intake.queue(checked, lambda ev: None)
    assert engine.table.outstanding == 0
