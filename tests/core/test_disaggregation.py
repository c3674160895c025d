"""The engine in its two split-mode roles, two engines with their own pools in one process:
the prefill engine holds a prompt's pages after the first token; the decode engine reserves
pages, takes the KV and first token from a kv_source, and generates the rest. (Here the
source copies pages tensor to tensor; the gloo channel and the gRPC handshake are tested in
test_kv_transfer.py and the cluster tests.)"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from strata.engine.engine import Engine
from strata.engine.request import KVSource, RemoteFill
from strata.kv.transfer import TransferError
from strata.sampling.params import SamplingParams
from tests.core.test_scheduler import (
    GREEDY,
    assert_pool_back_to_cache_only,
    prompts,
    run,
)


def remote_prefill(prefill: Engine, decode: Engine, gate: threading.Event | None = None):
    """A kv_source factory: prefill on the other engine, hold, copy the pages, release."""
    counter = iter(range(10**6))

    def source_for(prompt: list[int], params: SamplingParams) -> KVSource:
        def source(pages: list[int], cancel: threading.Event) -> RemoteFill:
            if gate is not None:
                assert gate.wait(30)
            rid, done, events = f"p{next(counter)}", threading.Event(), []

            def sink(ev):
                events.append(ev)
                if ev.finish_reason is not None:
                    done.set()

            prefill.submit(prompt, replace(params, max_new_tokens=1), sink, rid, hold=True)
            assert done.wait(30)
            last = events[-1]
            if last.finish_reason not in ("stop", "length"):
                raise TransferError(f"prefill failed: {last.error}")
            src = prefill.call(lambda: prefill.held_pages(rid)).result(10)
            assert len(src) == len(pages)
            decode.runner.kv.data[pages] = prefill.runner.kv.data[src]
            assert prefill.call(lambda: prefill.release_held(rid)).result(10)
            lp = last.logprobs[0] if last.logprobs else None
            return RemoteFill(last.token_ids[0], last.usage.cached_tokens, lp)

        return source

    return source_for


def run_split(decode: Engine, source_for, ps, params=GREEDY) -> tuple[list[list[int]], list]:
    events: dict[int, list] = {i: [] for i in range(len(ps))}
    for i, p in enumerate(ps):
        decode.submit(p, params, events[i].append, kv_source=source_for(p, params))
    decode.run_until_done()
    outs = [[t for e in events[i] for t in e.token_ids] for i in range(len(ps))]
    return outs, [events[i][-1] for i in range(len(ps))]


@pytest.fixture
def engines(runner_factory):
    prefill = Engine(runner_factory(128), max_batch_tokens=16, jump_forward=False)
    prefill.start()
    decode = Engine(runner_factory(128), max_batch_tokens=16)
    yield prefill, decode
    prefill.shutdown()


def test_split_roles_give_the_colocated_output_and_balance_both_pools(engines, runner_factory):
    prefill, decode = engines
    ps = [p[: 5 + 3 * i] for i, p in enumerate(prompts(6, length=24, shared=8))]
    expected = run(Engine(runner_factory(128), max_batch_tokens=16), ps)
    source_for = remote_prefill(prefill, decode)
    outs, lasts = run_split(decode, source_for, ps)
    assert outs == expected
    assert all(last.finish_reason == "length" for last in lasts)
    # the prefill worker caches prompts: a second round finds the shared prefix there
    outs, lasts = run_split(decode, source_for, ps)
    assert outs == expected
    assert all(last.usage.cached_tokens > 0 for last in lasts[1:])
    assert prefill.call(prefill.stats).result(10).held == 0
    for engine in (prefill, decode):
        assert_pool_back_to_cache_only(engine)


def test_seeded_sampling_is_the_same_split_or_colocated(engines, runner_factory):
    prefill, decode = engines
    params = SamplingParams(
        max_new_tokens=10, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True, logprobs=True
    )
    ps = prompts(3, length=12)
    expected = run(Engine(runner_factory(128)), ps, params)
    outs, lasts = run_split(decode, remote_prefill(prefill, decode), ps, params)
    assert outs == expected


def test_abort_while_the_kv_is_in_flight_keeps_its_pages_until_the_transfer_ends(engines):
    prefill, decode = engines
    gate = threading.Event()
    source_for = remote_prefill(prefill, decode, gate)
    free_before = decode.runner.pool.num_free
    events: list = []
    prompt = prompts(1, length=30)[0]
    rid = decode.submit(prompt, GREEDY, events.append, kv_source=source_for(prompt, GREEDY))
    decode._drain()
    decode.step()  # admitted: pages reserved, the source is blocked on the gate
    reserved = decode.runner.pages_for(len(prompt))
    assert decode.runner.pool.num_free == free_before - reserved
    decode.abort(rid)
    decode._drain()
    assert events[-1].finish_reason == "abort"  # the client hears at once...
    assert decode.runner.pool.num_free == free_before - reserved  # ...the pages wait
    gate.set()
    decode.run_until_done()
    deadline = time.monotonic() + 30
    while decode.runner.pool.num_free != free_before and time.monotonic() < deadline:
        decode._handle(*decode._inbox.get(timeout=30))  # the transfer's end frees them
    assert decode.runner.pool.num_free == free_before
    assert_pool_back_to_cache_only(prefill)


def test_a_failed_transfer_is_an_error_and_frees_the_reservation(engines):
    _, decode = engines

    def broken(pages: list[int], cancel: threading.Event) -> RemoteFill:
        raise TransferError("KV transfer failed: peer went away")

    events: list = []
    decode.submit(prompts(1, length=30)[0], GREEDY, events.append, kv_source=broken)
    decode.run_until_done()
    assert events[-1].finish_reason == "error"
    assert "peer went away" in events[-1].error
    assert_pool_back_to_cache_only(decode)


def test_held_pages_nobody_pulls_are_released_after_the_timeout(runner_factory):
    prefill = Engine(runner_factory(64), hold_timeout=0.2, jump_forward=False)
    prefill.start()
    try:
        done = threading.Event()
        prefill.submit(
            prompts(1, length=30)[0],
            replace(GREEDY, max_new_tokens=1),
            lambda ev: ev.finish_reason and done.set(),
            "held",
            hold=True,
        )
        assert done.wait(30)
        assert prefill.call(prefill.stats).result(10).held == 1
        assert len(prefill.call(lambda: prefill.held_pages("held")).result(10)) == 8
        deadline = time.monotonic() + 10
        while prefill.call(prefill.stats).result(10).held and time.monotonic() < deadline:
            time.sleep(0.1)
        assert prefill.call(prefill.stats).result(10).held == 0
        assert_pool_back_to_cache_only(prefill)
    finally:
        prefill.shutdown()
