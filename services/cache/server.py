"""The cache service: the cluster's prefix index, one RadixTree per (worker, tier).

The trees hold page ids owned by the workers; the service never touches KV memory. Evict
returns the pages the calling worker must free. Route tells the gateway how many leading
tokens of a prompt each worker holds.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict

import grpc

from services.grpcio import run_until_signal, start_server
from strata.proto.v1 import cache_pb2, cache_pb2_grpc
from strata.radix.tree import RadixTree

log = logging.getLogger(__name__)


class CacheService(cache_pb2_grpc.CacheServicer):
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.trees: dict[tuple[str, str], RadixTree] = {}
        self.lock = threading.Lock()  # the trees are plain Python: one call at a time

    def tree(self, worker: str, tier: str) -> RadixTree:
        key = (worker, tier or "l1")
        if key not in self.trees:
            self.trees[key] = RadixTree(self.page_size)
        return self.trees[key]

    async def Match(self, request, context):  # noqa: N802 (gRPC method names)
        with self.lock:
            m = self.tree(request.worker, request.tier).match_prefix(request.token_ids)
        return cache_pb2.MatchResponse(pages=m.pages, length=m.length, node=m.node)

    async def Insert(self, request, context):  # noqa: N802
        seq = request.seq
        if len(request.pages) * self.page_size != len(seq.token_ids):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "insert takes whole pages: one page id per page_size tokens",
            )
        with self.lock:
            existing = self.tree(seq.worker, seq.tier).insert(seq.token_ids, request.pages)
        return cache_pb2.InsertResponse(existing=existing)

    async def Lock(self, request, context):  # noqa: N802
        try:
            with self.lock:
                self.tree(request.worker, request.tier).lock(request.node)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no node {request.node}")
        return cache_pb2.Empty()

    async def Unlock(self, request, context):  # noqa: N802
        try:
            with self.lock:
                self.tree(request.worker, request.tier).unlock(request.node)
        except (KeyError, ValueError):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"node {request.node} is not locked"
            )
        return cache_pb2.Empty()

    async def Evict(self, request, context):  # noqa: N802
        with self.lock:
            pages = self.tree(request.worker, request.tier).evict(request.num_pages)
        return cache_pb2.PageList(pages=pages)

    async def RecordLookup(self, request, context):  # noqa: N802
        with self.lock:
            self.tree(request.worker, request.tier).record_lookup(
                request.prompt_tokens, request.cached_tokens
            )
        return cache_pb2.Empty()

    async def Route(self, request, context):  # noqa: N802
        with self.lock:
            lengths = {
                worker: tree.match_prefix(request.token_ids).length
                for (worker, tier), tree in self.trees.items()
                if tier == "l1"
            }
        return cache_pb2.RouteResponse(cached_tokens=lengths)

    async def Stats(self, request, context):  # noqa: N802
        with self.lock:
            stats = asdict(self.tree(request.worker, request.tier).stats())
        return cache_pb2.StatsResponse(**stats)

    async def Flush(self, request, context):  # noqa: N802
        with self.lock:
            pages = self.tree(request.worker, request.tier).flush()
        return cache_pb2.PageList(pages=pages)


async def serve(host: str, port: int, page_size: int) -> None:
    name = cache_pb2.DESCRIPTOR.services_by_name["Cache"].full_name
    add = cache_pb2_grpc.add_CacheServicer_to_server
    server, bound = await start_server(host, port, [(add, CacheService(page_size), name)])
    log.info("cache service on %s:%d (page size %d)", host, bound, page_size)
    await run_until_signal(server, grace=5)
