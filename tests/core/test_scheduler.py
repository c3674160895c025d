"""Engine and scheduler on a tiny random model: batching, pressure, abort, page accounting."""

from __future__ import annotations

import pytest

from strata.engine.engine import Engine
from strata.engine.generate import generate
from strata.engine.request import Status
from strata.engine.runner import ModelRunner
from strata.sampling.params import SamplingParams

GREEDY = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)


def run(engine: Engine, prompts, params=GREEDY) -> list[list[int]]:
    events: dict[int, list] = {i: [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        engine.submit(p, params, events[i].append)
    engine.run_until_done()
    for evs in events.values():
        assert evs[-1].finish_reason is not None
    return [[t for e in events[i] for t in e.token_ids] for i in range(len(prompts))]


def prompts(n: int, length: int = 10, shared: int = 8) -> list[list[int]]:
    base = list(range(50, 50 + shared))
    return [base + [(i * 7 + j) % 300 for j in range(length - shared)] for i in range(n)]


def assert_pool_back_to_cache_only(engine: Engine) -> None:
    stats = engine.prefix_cache.stats() if engine.prefix_cache else None
    cached = stats.cached_pages if stats else 0
    assert engine.runner.pool.num_free + cached == engine.runner.pool.num_pages
    if stats:
        assert stats.locked_pages == 0


def reference(runner: ModelRunner, ps: list[list[int]]) -> list[list[int]]:
    return [list(generate(runner, p, GREEDY.max_new_tokens)) for p in ps]


def test_continuous_batching_matches_one_at_a_time(runner_factory):
    runner = runner_factory(256)
    ps = prompts(6)
    expected = reference(runner, ps)
    engine = Engine(runner, max_batch_tokens=16)  # forces chunked prefill
    assert run(engine, ps) == expected
    assert run(engine, ps) == expected  # warm: prefixes now come from the cache
    assert engine.prefix_cache is not None and engine.prefix_cache.stats().cached_tokens > 0
    assert_pool_back_to_cache_only(engine)


def test_tiny_pool_queues_evicts_and_preempts_without_crashing(runner_factory):
    ps = prompts(8, length=14, shared=4)
    expected = reference(runner_factory(256), ps)
    # each request needs up to 7 pages; 12 pages cannot hold two at full length
    engine = Engine(runner_factory(12), max_batch_tokens=64)
    assert run(engine, ps) == expected
    assert_pool_back_to_cache_only(engine)


def test_request_status_follows_admission_preemption_and_finish(runner_factory):
    engine = Engine(runner_factory(12), max_batch_tokens=64)
    for p in prompts(8, length=14, shared=4):
        engine.submit(p, GREEDY, lambda ev: None)
    engine._drain()
    reqs = list(engine._requests.values())
    assert [r.status for r in reqs] == [Status.WAITING] * 8
    seen: dict[str, list[Status]] = {r.rid: [Status.WAITING] for r in reqs}
    while engine.scheduler.has_work:
        engine.step()
        for r in reqs:
            assert bool(r.pages) == (r.status is Status.RUNNING), r  # pages iff running
            if seen[r.rid][-1] is not r.status:
                seen[r.rid].append(r.status)
    assert all(r.status is Status.FINISHED and r.finish_reason == "length" for r in reqs)
    assert all(s[:2] == [Status.WAITING, Status.RUNNING] for s in seen.values())
    preempted = [Status.RUNNING, Status.WAITING, Status.RUNNING]
    assert any(s[1:4] == preempted for s in seen.values())  # 12 pages hold one at full length


def test_cache_disabled_frees_every_page(runner_factory):
    runner = runner_factory(64)
    engine = Engine(runner, enable_cache=False)
    assert run(engine, prompts(4)) == reference(runner, prompts(4))
    assert runner.pool.num_free == runner.pool.num_pages


def abort_after_steps(engine: Engine, prompt: list[int], params, steps: int) -> None:
    """Submit prompt, run `steps` engine steps, abort it: it ends as aborted and its pages
    go back (only the radix cache holds any)."""
    events: list = []
    rid = engine.submit(prompt, params, events.append)
    engine._drain()
    for _ in range(steps):
        engine.step()
    engine.abort(rid)
    engine.run_until_done()
    assert events[-1].finish_reason == "abort"
    assert_pool_back_to_cache_only(engine)


def test_abort_at_any_time_releases_pages(runner_factory):
    runner = runner_factory(64)
    engine = Engine(runner, max_batch_tokens=4)
    for steps_before_abort in range(0, 8):
        abort_after_steps(engine, prompts(1, length=12)[0], GREEDY, steps_before_abort)


def test_generated_tokens_are_cached_for_the_next_turn(runner_factory):
    runner = runner_factory(64)
    engine = Engine(runner)
    first = prompts(1, length=9)[0]
    (reply,) = run(engine, [first])
    events: list = []
    engine.submit(first + reply + [7, 7, 7], GREEDY, events.append)
    engine.run_until_done()
    # prompt + all but the last reply token have KV; whole pages of that are reused
    assert events[-1].usage.cached_tokens == (len(first) + len(reply) - 1) // 4 * 4


def test_requests_that_can_never_run_are_rejected_up_front(runner_factory):
    engine = Engine(runner_factory(4))
    with pytest.raises(ValueError, match="more KV pages"):
        engine.submit(list(range(30)), GREEDY, lambda e: None)
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([10**6], GREEDY, lambda e: None)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], GREEDY, lambda e: None)


def test_a_request_past_its_deadline_is_aborted_and_frees_its_pages(runner_factory):
    runner = runner_factory(64)
    engine = Engine(runner, request_timeout=1e-6)  # every request is late at once
    events: list = []
    engine.submit(prompts(1)[0], GREEDY, events.append)
    engine.run_until_done()
    assert events[-1].finish_reason == "abort" and "timed out" in events[-1].error
    assert_pool_back_to_cache_only(engine)
    patient = Engine(runner, request_timeout=60)
    assert run(patient, prompts(1)) == reference(runner, prompts(1))


def test_a_request_that_outgrows_the_pool_alone_ends_with_length(runner_factory):
    """Its prompt fits, its context outgrows every page: it ends ("length", the tokens it
    made) instead of waiting forever to be readmitted, and frees its pages."""
    engine = Engine(runner_factory(6), max_batch_tokens=64)
    events: list = []
    engine.submit(
        list(range(10, 22)),
        SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True),
        events.append,
    )
    engine.run_until_done()
    assert events[-1].finish_reason == "length"
    assert sum(len(e.token_ids) for e in events) == 6 * 4 - 12 + 1  # up to the last page's end
    assert engine.scheduler.preemptions == 0
    assert_pool_back_to_cache_only(engine)


def test_the_in_process_engine_is_an_engine_handle(runner_factory):
    """validate, stream and ask, as a front uses an engine process, on the engine's own
    thread: the stream runs to its end, and Stats, FlushCache and AbortNow are answered."""
    import asyncio

    from strata.engine.messages import AbortNow, FlushCache, Stats

    engine = Engine(runner_factory(64))
    engine.start()
    params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)

    async def use() -> tuple:
        checked = engine.validate(prompts(1, length=12)[0], params)
        events = [ev async for ev in engine.stream(checked)]
        stats = await engine.ask(Stats())
        return events, stats, await engine.ask(FlushCache()), await engine.ask(AbortNow("none"))

    try:
        events, stats, flushed, found = asyncio.run(use())
    finally:
        engine.shutdown()
    assert sum(len(e.token_ids) for e in events) == 5 and events[-1].finish_reason == "length"
    assert (stats.running, stats.waiting) == (0, 0) and stats.pages_free < stats.pages_total
    assert flushed > 0 and found is False


@pytest.mark.parametrize("cache", [True, False])
def test_pages_behind_every_layers_window_go_back_to_the_pool(tiny_checkpoint, cache):
    """Mistral with a window of 8 on every layer, pages of 4: three requests of 10 + 40
    tokens would need 39 pages, the pool has 20; the pages every window has passed go back
    to the pool as the requests decode, so nothing is preempted, and the freed pages other
    requests then fill are never read: the tokens equal one-at-a-time generation."""
    from strata.config import KVPoolConfig, ModelConfig

    folder, _ = tiny_checkpoint("mistral", sliding_window=8)
    model = ModelConfig(str(folder), dtype="float32")
    ps = prompts(3)
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    big = ModelRunner.from_config(model, KVPoolConfig(page_size=4, num_pages=256))
    expected = [list(generate(big, p, 40)) for p in ps]
    runner = ModelRunner.from_config(model, KVPoolConfig(page_size=4, num_pages=20))
    engine = Engine(runner, max_batch_tokens=16, enable_cache=cache)
    assert engine.scheduler.window == 8
    assert run(engine, ps, params) == expected
    assert engine.scheduler.preemptions == 0
    assert_pool_back_to_cache_only(engine)
    if cache:  # the tree kept the prompts' pages, not the dropped output's
        assert engine.prefix_cache.stats().cached_tokens <= 3 * 8
