"""The cache service as a real process over real gRPC, fed by a real engine's KV events: its
mirror routes by what the worker holds per tier; killing it never fails a request; after a
restart it rebuilds the same index from the worker's snapshot."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import grpc
import pytest

from launch.local import free_port, grpc_service
from services.cache.publisher import KVEventPublisher
from services.convert import batch_to_proto
from strata.cache.mirror import Batch
from strata.cache.results import KVEvent
from strata.config import HiCacheConfig, KVPoolConfig, ModelConfig
from strata.engine.engine import Engine
from strata.engine.runner import ModelRunner
from strata.proto.v1 import cache_pb2, cache_pb2_grpc
from strata.sampling.params import SamplingParams

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
PROMPTS = [[(5 * i + 3 * j) % 300 + 2 for j in range(30)] for i in range(6)]


def stub(target: str) -> cache_pb2_grpc.CacheStub:
    return cache_pb2_grpc.CacheStub(grpc.insecure_channel(target))


def wait_for(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def generate(engine: Engine, prompt: list[int]) -> list[int]:
    done: list = []
    engine.submit(prompt, GREEDY, done.append)
    wait_for(lambda: bool(done) and done[-1].finish_reason is not None, 60)
    assert done[-1].finish_reason == "length", done[-1].error
    return [t for ev in done for t in ev.token_ids]


def mirror_keys(target: str, worker: str) -> dict[str, int]:
    m = stub(target).Stats(cache_pb2.StatsRequest(), timeout=5).workers.get(worker)
    return {"l1": m.l1_pages, "l2": m.l2_pages} if m else {}


def route(target: str, prompt: list[int]) -> cache_pb2.RouteResponse:
    return stub(target).Route(cache_pb2.RouteRequest(token_ids=prompt), timeout=5)


@pytest.fixture
def worker(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    runner = ModelRunner.from_config(
        ModelConfig(str(folder), dtype="float32"), KVPoolConfig(page_size=4, num_pages=40)
    )
    # a small L1 and an L2: the routes must show both tiers
    engine = Engine(runner, tiers=HiCacheConfig(enabled=True), cluster_worker=True)
    engine.start()
    yield engine
    engine.shutdown()


def test_mirror_follows_the_worker_and_survives_a_cache_service_kill(worker):
    port = free_port()
    publisher = None
    with grpc_service("cache", port=port) as (target, proc):
        publisher = KVEventPublisher(target, "w1", worker, heartbeat=0.2)
        worker.event_sink = publisher
        publisher.start()
        outputs = [generate(worker, p) for p in PROMPTS]

        def in_sync() -> bool:
            snap = worker.call(worker.prefix_cache.snapshot).result(5)
            return mirror_keys(target, "w1") == {t: len(set(k)) for t, k in snap.items()}

        wait_for(in_sync)
        tiers = worker.call(worker.prefix_cache.snapshot).result(5)
        assert tiers["l2"] and set(tiers["l2"]) - set(tiers["l1"]), "expected L2-only pages"
        first, last = route(target, PROMPTS[0]), route(target, PROMPTS[-1])
        # the oldest prompt was pushed out of L1 into L2; the newest is in L1
        assert first.workers["w1"].l1_tokens < first.workers["w1"].l2_tokens
        assert last.workers["w1"].l1_tokens >= 28 and last.workers["w1"].page_size == 4
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # the worker serves on with the service gone, and its answers do not change
        assert [generate(worker, p) for p in PROMPTS[:3]] == outputs[:3]
    snapshots = publisher.snapshots
    with grpc_service("cache", port=port) as (target, _):  # restarted, empty
        wait_for(in_sync)  # rebuilt from a new snapshot
        assert publisher.snapshots > snapshots
        assert route(target, PROMPTS[-1]).workers["w1"].l1_tokens > 0
        assert [generate(worker, p) for p in PROMPTS[3:]] == outputs[3:]
        wait_for(in_sync)
    publisher.stop()


def test_out_of_sequence_batches_ask_for_a_snapshot():
    a, b, c = (bytes([i]) * 16 for i in range(3))  # page keys are 16 bytes
    with grpc_service("cache") as (target, _):
        s = stub(target)

        def send(first_seq: int, snapshot: bool, keys: list[bytes]) -> bool:
            batch = Batch(
                "w", b"seed", 4, first_seq, snapshot, [KVEvent("stored", "l1", keys)], {}, 0
            )
            return not s.Publish(batch_to_proto(batch), timeout=5).need_snapshot

        assert not send(0, False, [a]), "an unknown worker must start with a snapshot"
        assert send(5, True, [a])
        assert send(5, False, [b])  # events 5.. follow the snapshot
        assert not send(5, False, [c]), "a replayed or missing batch is a gap"
        assert mirror_keys(target, "w") == {"l1": 2, "l2": 0}


def test_batches_no_worker_sends_are_refused_and_routing_goes_on():
    """Found by the reliability suite's generated protobufs: a batch with page size 0 was
    taken, and every later Route failed (UNKNOWN) for every gateway."""
    key = bytes(16)
    bad = [
        Batch("w", b"s", 0, 0, True, [], {}, 0),
        Batch("", b"s", 4, 0, True, [], {}, 0),
        Batch("w", b"s", 4, 0, True, [KVEvent("stored", "l9", [key])], {}, 0),
        Batch("w", b"s", 4, 0, True, [KVEvent("eaten", "l1", [key])], {}, 0),
        Batch("w", b"s", 4, 0, True, [KVEvent("stored", "l1", [b"short"])], {}, 0),
    ]
    with grpc_service("cache") as (target, _):
        s = stub(target)
        for batch in bad:
            with pytest.raises(grpc.RpcError) as err:
                s.Publish(batch_to_proto(batch), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert not route(target, list(range(12))).workers  # nothing was taken
