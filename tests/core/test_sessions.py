"""Sessions on the engine (tiny random model): a session's request continues its previous
request's tokens and generates what the whole prompt would; the newest prefix stays pinned
(locked: flushing the cache leaves it) within the budget; closing the session or its TTL
running out gives every page back."""

from __future__ import annotations

import pytest

from strata.engine.engine import Engine
from strata.engine.messages import CloseSession, OpenSession, SessionContext, Stats
from strata.engine.request import SessionRef
from strata.engine.sessions import Sessions
from strata.sampling.params import SamplingParams

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
TURNS = [[50 + i for i in range(13)], [90, 91, 92, 93, 94], [120, 121, 122, 123, 124, 125, 126]]


def run(engine: Engine, prompt: list[int], session: SessionRef | None = None, rid=None):
    from dataclasses import replace

    events: list = []
    checked = replace(engine.validate(prompt, GREEDY), session=session)
    rid = engine.intake.queue(checked, events.append, rid)
    engine.run_until_done()
    assert events[-1].finish_reason == "length"
    return rid, [t for e in events for t in e.token_ids]


def locked(engine: Engine) -> int:
    return engine.prefix_cache.stats().locked_pages


def test_turns_continue_the_session_and_close_gives_every_page_back(runner_factory):
    engine = Engine(runner_factory(64), max_batch_tokens=16)
    sid = engine.answer(OpenSession())
    whole: list[int] = []
    for turn in TURNS:
        before = engine.answer(SessionContext(sid, new=len(turn)))
        assert before == whole  # the newest request's prompt and output
        rid, out = run(engine, before + turn, SessionRef(sid))
        alone = Engine(runner_factory(64), max_batch_tokens=16)
        assert out == run(alone, whole + turn)[1]  # as if sent whole, with no session
        whole = whole + turn + out
        assert engine.answer(Stats()).sessions["pinned_pages"] == (len(whole) - 1) // 4
        assert locked(engine) > 0
    # an earlier request of the session, cut at an offset
    assert engine.answer(SessionContext(sid, rid=rid, offset=-3)) == whole[:-3]
    engine.flush_cache()
    assert locked(engine) == (len(whole) - 1) // 4  # the pin outlives a flush
    assert engine.answer(CloseSession(sid)) is True
    assert locked(engine) == 0 and engine.answer(Stats()).sessions["open"] == 0
    engine.flush_cache()
    assert engine.runner.pool.num_free == engine.runner.pool.num_pages
    with pytest.raises(ValueError, match="not open"):
        engine.answer(SessionContext(sid))


def test_ttl_expiry_and_the_pin_budget_release_pins():
    """On a fake clock and a stand-in cache: a session is released when its TTL (renewed by
    each request) runs out; past the budget the least recently used session's pin goes."""

    class Cache:
        locks: dict[int, int] = {}

        def match(self, tokens):
            class M:
                length = len(tokens) // 4 * 4
                node = tokens[0] * 1000 + len(tokens)

            return M

        def lock(self, node):
            self.locks[node] = self.locks.get(node, 0) + 1

        def unlock(self, node):
            self.locks[node] -= 1

    now = [0.0]
    cache = Cache()
    sessions = Sessions(cache, page_size=4, budget_pages=5, clock=lambda: now[0])
    a, b = sessions.open(ttl=10), sessions.open(ttl=10)
    sessions.finished(a, "r1", list(range(12)), replace=False, ok=True)  # 3 pages
    now[0] = 8.0
    sessions.finished(b, "r2", list(range(100, 112)), replace=False, ok=True)  # 3 more: over
    assert sessions.get(a).pinned_pages == 0 and sessions.get(b).pinned_pages == 3
    assert cache.locks == {12: 0, 100012: 1}  # a's pin released
    sessions.finished(a, "r3", list(range(8)), replace=False, ok=False)  # failed: no pin
    assert sessions.get(a).pinned_pages == 0 and sessions.context(a) == list(range(12))
    now[0] = 17.0  # a was renewed at 8 (its failed request), b at 8: both live until 18
    assert sessions.expire() == 0
    now[0] = 18.5
    assert sessions.expire() == 2 and sum(cache.locks.values()) == 0
    with pytest.raises(ValueError, match="capacity"):
        capped = sessions.open(capacity=10)
        sessions.context(capped, new=11)
    for bad in ({"ttl": 0}, {"capacity": 0}):
        with pytest.raises(ValueError):
            sessions.open(**bad)
