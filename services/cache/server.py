"""The cache service: the cluster's prefix index (a mirror of every worker's radix tree, fed
by the workers' KV events) for routing and stats, the LRU of the shared L3 store (a
directory; Redis keeps its own), and the registry of live workers (discovery).

It is never on a worker's hot path: workers publish asynchronously and keep serving while
it is down, the gateway routes by load alone without it, and after a restart it rebuilds
its index from the workers' snapshots and the L3 directory.
"""

from __future__ import annotations

import logging

import grpc

from services.convert import batch_from_proto, costs_to_proto
from services.grpcio import run_until_signal, start_server
from strata.cache.mirror import ClusterIndex
from strata.cache.registry import WorkerRegistry
from strata.kv.redis_store import RedisIndex
from strata.kv.store import L3Index, StoreIndex
from strata.proto.v1 import cache_pb2, cache_pb2_grpc

log = logging.getLogger(__name__)


class CacheService(cache_pb2_grpc.CacheServicer):
    def __init__(self, index: ClusterIndex, registry: WorkerRegistry | None = None) -> None:
        self.index = index
        self.registry = registry or WorkerRegistry()

    async def Register(self, request, context):  # noqa: N802
        try:
            self.registry.beat(request.address, request.role, request.ttl_s)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return cache_pb2.RegisterResponse()

    async def Workers(self, request, context):  # noqa: N802
        seen = self.registry.snapshot()
        return cache_pb2.WorkersResponse(
            workers=[
                cache_pb2.RegisteredWorker(address=w.address, role=w.role, age_s=w.age)
                for w in seen.live
            ],
            settling=seen.settling,
            gone=seen.gone,
        )

    async def Publish(self, request, context):  # noqa: N802 (gRPC method names)
        try:
            batch = batch_from_proto(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        applied = self.index.apply(batch)
        return cache_pb2.PublishResponse(need_snapshot=not applied)

    async def Route(self, request, context):  # noqa: N802
        workers, l3 = self.index.route(list(request.token_ids))
        return cache_pb2.RouteResponse(
            workers={
                w: cache_pb2.WorkerRoute(
                    l1_tokens=r.l1_tokens,
                    l2_tokens=r.l2_tokens,
                    costs=costs_to_proto(r.costs),
                    page_size=r.page_size,
                )
                for w, r in workers.items()
            },
            l3_tokens=l3,
        )

    async def Stats(self, request, context):  # noqa: N802
        store = self.index.store
        reply = cache_pb2.StatsResponse(
            workers={w: cache_pb2.WorkerMirror(**m) for w, m in self.index.stats().items()}
        )
        if store is not None:
            reply.l3_pages, reply.l3_bytes = len(store), store.total_bytes
            reply.l3_budget_bytes, reply.l3_evicted = store.budget, store.evicted
        return reply


async def serve(
    host: str,
    port: int,
    storage_dir: str | None,
    storage_size_gb: float,
    storage_url: str | None = None,
) -> None:
    store: L3Index | None = None
    if storage_url:
        store = RedisIndex(storage_url)
    elif storage_dir:
        store = StoreIndex(storage_dir, int(storage_size_gb * 1e9))
    name = cache_pb2.DESCRIPTOR.services_by_name["Cache"].full_name
    add = cache_pb2_grpc.add_CacheServicer_to_server
    server, bound = await start_server(host, port, [(add, CacheService(ClusterIndex(store)), name)])
    where = store.link.safe_url if isinstance(store, RedisIndex) else storage_dir or "none"
    log.info("cache service on %s:%d (L3 store: %s)", host, bound, where)
    await run_until_signal(server, grace=5)
