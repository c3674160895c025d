"""The cache service's mirror of the workers' trees, and the gateway's route cost over tiers."""

from __future__ import annotations

from gateway.remote import route_cost
from services.convert import costs_to_proto
from strata.cache.keys import page_keys
from strata.cache.mirror import Batch, ClusterIndex
from strata.cache.results import KVEvent
from strata.cache.tree import RadixTree
from strata.proto.v1 import cache_pb2

PS = 4


def publish(index: ClusterIndex, worker: str, tree: RadixTree, seq: int) -> int:
    events = tree.take_events()
    assert index.apply(Batch(worker, tree.seed, PS, seq, False, events, {}, 0))
    return seq + len(events)


def test_mirror_routes_by_what_each_worker_holds_per_tier():
    index = ClusterIndex()
    a, b = RadixTree(PS, b"m", record_events=True), RadixTree(PS, b"m", record_events=True)
    for w, t in (("a", a), ("b", b)):
        assert not index.apply(Batch(w, t.seed, PS, 0, False, [], {}, 0)), "snapshot first"
        assert index.apply(Batch(w, t.seed, PS, 0, True, [], {}, 0))
    prompt = list(range(40))
    a.insert(prompt[:24], list(range(6)))
    b.insert(prompt[:8], [0, 1])
    seq_a, seq_b = publish(index, "a", a, 0), publish(index, "b", b, 0)
    routes, _ = index.route(prompt)
    assert (routes["a"].l1_tokens, routes["a"].l2_tokens) == (24, 24)
    assert (routes["b"].l1_tokens, routes["b"].l2_tokens) == (8, 8)
    # a's prefix (one node) leaves L1 for L2
    a.evict(1, demote=lambda pages: list(range(100, 100 + len(pages))))
    publish(index, "a", a, seq_a)
    routes, _ = index.route(prompt)
    assert (routes["a"].l1_tokens, routes["a"].l2_tokens) == (0, 24)
    assert seq_b == 1  # one stored event per node
    # a mirror that missed a batch asks for a snapshot instead of drifting
    assert not index.apply(Batch("b", b.seed, PS, seq_b + 5, False, [], {}, 0))
    snap = [KVEvent("stored", t, keys) for t, keys in b.snapshot().items() if keys]
    assert index.apply(Batch("b", b.seed, PS, 9, True, snap, {}, 0))
    assert index.route(prompt)[0]["b"].l1_tokens == 8
    assert page_keys(b"m", prompt[:8], PS) == a.keys_of(prompt[:8])


def held(l1: int, l2: int, **costs: float) -> cache_pb2.WorkerRoute:
    return cache_pb2.WorkerRoute(
        l1_tokens=l1, l2_tokens=l2, costs=costs_to_proto(costs), page_size=16
    )


def test_route_cost_prefers_loading_over_computing_by_measured_cost():
    assert route_cost(1000, None, 0) == 1000
    assert route_cost(1000, held(800, 800), 0) == 200
    in_l2 = route_cost(1000, held(0, 800), 0)
    assert 200 < in_l2 < 1000  # loading 800 tokens beats computing them
    assert route_cost(1000, None, 800) < 1000  # the shared L3 store holds them
    # measured: an L2 page loads in 1/100 of the time 16 tokens take to compute
    cheap = route_cost(1000, held(0, 800, compute_token=1e-3, l2_page=1.6e-4), 0)
    assert abs(cheap - (200 + 800 * 0.01)) < 1e-6
    # measured: an L3 page costs more than computing it: the route says so
    slow = route_cost(1000, held(0, 0, compute_token=1e-4, l3_page=1e-2), 800)
    assert slow > 1000
