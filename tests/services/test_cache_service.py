"""The cache service as a real process over real gRPC: the engine runs the same over the
remote index as over the in-process one, Route reports per-worker prefixes, locks balance."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from services.cache.client import RemoteCacheIndex
from strata.config import CacheConfig, ModelConfig
from strata.engine.engine import Engine
from strata.engine.runner import ModelRunner
from strata.proto.v1 import cache_pb2, cache_pb2_grpc
from tests.core.test_scheduler import run
from tests.e2e.server import grpc_service


@pytest.fixture(scope="module")
def cache_target() -> Iterator[str]:
    with grpc_service("cache", "--page-size", "4") as (target, _):
        yield target


def test_engine_over_remote_index_equals_in_process(cache_target, tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")

    def make_runner() -> ModelRunner:
        return ModelRunner.from_config(ModelConfig(str(folder), dtype="float32"),
                                       CacheConfig(page_size=4, num_pages=64))  # fmt: skip

    runner = make_runner()
    shared = list(range(10, 40))
    prompts = [shared + [50 + i, 60 + i] for i in range(6)]
    local = run(Engine(runner), prompts)
    runner2 = make_runner()
    remote_index = RemoteCacheIndex(cache_target, worker="w-test")
    engine = Engine(runner2, cache=remote_index)
    assert run(engine, prompts) == local
    again = run(engine, prompts)  # warm: the whole prompts are cached remotely now
    assert again == local
    stats = remote_index.stats()
    assert stats.cached_tokens > 0 and stats.locked_pages == 0
    assert stats.cached_pages + runner2.pool.num_free == runner2.pool.num_pages

    route = cache_pb2_grpc.CacheStub(grpc.insecure_channel(cache_target)).Route(
        cache_pb2.RouteRequest(token_ids=prompts[0]), timeout=5)  # fmt: skip
    assert route.cached_tokens["w-test"] >= len(shared) // 4 * 4
    assert engine.flush_cache() == stats.cached_pages
    assert runner2.pool.num_free == runner2.pool.num_pages


def test_bad_calls_are_refused_clearly(cache_target):
    stub = cache_pb2_grpc.CacheStub(grpc.insecure_channel(cache_target))
    with pytest.raises(grpc.RpcError) as err:
        seq = cache_pb2.TokenSeq(worker="w", token_ids=[1, 2, 3])
        stub.Insert(cache_pb2.InsertRequest(seq=seq, pages=[7]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    seq = cache_pb2.TokenSeq(worker="w", token_ids=[1, 2, 3, 4])
    stub.Insert(cache_pb2.InsertRequest(seq=seq, pages=[7]), timeout=5)
    node = stub.Match(seq, timeout=5).node
    with pytest.raises(grpc.RpcError) as err:  # never locked
        stub.Unlock(cache_pb2.NodeRequest(worker="w", node=node), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        stub.Lock(cache_pb2.NodeRequest(worker="w", node=12345), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
