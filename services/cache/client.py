"""RemoteCacheIndex: the CacheIndex interface over the cache service's gRPC API, so an
engine cannot tell an in-process tree from the cluster's."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from services.convert import tree_stats_from_proto
from strata.proto.v1 import cache_pb2, cache_pb2_grpc
from strata.radix.index import CacheIndex
from strata.radix.tree import MatchResult, TreeStats


class RemoteCacheIndex(CacheIndex):
    def __init__(self, target: str, worker: str, tier: str = "l1", timeout: float = 10.0):
        self.channel = grpc.insecure_channel(target)
        self.stub = cache_pb2_grpc.CacheStub(self.channel)
        self.worker, self.tier, self.timeout = worker, tier, timeout

    def _seq(self, tokens: Sequence[int]) -> cache_pb2.TokenSeq:
        return cache_pb2.TokenSeq(worker=self.worker, tier=self.tier, token_ids=list(tokens))

    def _node(self, node: int) -> cache_pb2.NodeRequest:
        return cache_pb2.NodeRequest(worker=self.worker, tier=self.tier, node=node)

    def match(self, tokens: Sequence[int]) -> MatchResult:
        r = self.stub.Match(self._seq(tokens), timeout=self.timeout)
        return MatchResult(list(r.pages), r.length, r.node)

    def lock(self, node: int) -> None:
        self.stub.Lock(self._node(node), timeout=self.timeout)

    def unlock(self, node: int) -> None:
        self.stub.Unlock(self._node(node), timeout=self.timeout)

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> int:
        req = cache_pb2.InsertRequest(seq=self._seq(tokens), pages=list(pages))
        return int(self.stub.Insert(req, timeout=self.timeout).existing)

    def evict(self, num_pages: int) -> list[int]:
        req = cache_pb2.EvictRequest(worker=self.worker, tier=self.tier, num_pages=num_pages)
        return list(self.stub.Evict(req, timeout=self.timeout).pages)

    def record_lookup(self, prompt_tokens: int, cached_tokens: int) -> None:
        req = cache_pb2.LookupRecord(
            worker=self.worker,
            tier=self.tier,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
        )
        self.stub.RecordLookup(req, timeout=self.timeout)

    def stats(self) -> TreeStats:
        req = cache_pb2.WorkerRequest(worker=self.worker, tier=self.tier)
        return tree_stats_from_proto(self.stub.Stats(req, timeout=self.timeout))

    def flush(self) -> list[int]:
        req = cache_pb2.WorkerRequest(worker=self.worker, tier=self.tier)
        return list(self.stub.Flush(req, timeout=self.timeout).pages)

    def close(self) -> None:
        self.channel.close()
