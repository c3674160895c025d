"""What the prefill and decode workers share: an engine, a worker id, transfer counters, and
the Load, FlushCache and Abort calls over them."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc

from services.convert import tier_stats_to_proto, tree_stats_to_proto
from services.grpcio import open_aio_channel, run_until_signal, start_server
from strata.engine.engine import Engine
from strata.engine.messages import AbortNow, FlushCache, Stats
from strata.proto.v1 import cache_pb2, cache_pb2_grpc, worker_pb2

log = logging.getLogger(__name__)
HEARTBEAT_S = 1.0  # between a worker's registrations at the cache service
REGISTRY_TTL_S = 3.0  # an entry not renewed within this leaves routing


class TransferCounter:
    def __init__(self) -> None:
        self.transfers, self.bytes, self.seconds = 0, 0, 0.0
        self._lock = threading.Lock()  # transfers finish on several threads

    def add(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.transfers += 1
            self.bytes += nbytes
            self.seconds += seconds


class EngineWorker:
    """Mixed into a generated servicer (PrefillServicer or DecodeServicer)."""

    def __init__(self, engine: Engine, worker_id: str) -> None:
        self.engine, self.worker_id = engine, worker_id
        self.transferred = TransferCounter()

    async def Load(self, request, context):  # noqa: N802 (gRPC method names)
        s = await self.engine.ask(Stats())
        t = self.transferred
        reply = worker_pb2.LoadResponse(
            worker=self.worker_id,
            running=s.running,
            waiting=s.waiting,
            pages_total=s.pages_total,
            pages_free=s.pages_free,
            held_requests=s.held,
            transfers=t.transfers,
            transfer_bytes=t.bytes,
            transfer_seconds=t.seconds,
        )
        if s.cache is not None:
            reply.cache.CopyFrom(tree_stats_to_proto(s.cache))
        if s.tiers is not None:
            reply.tiers.CopyFrom(tier_stats_to_proto(s.tiers))
        if s.memory is not None:
            reply.memory.CopyFrom(worker_pb2.MemoryPlan(**s.memory))
        return reply

    async def FlushCache(self, request, context):  # noqa: N802
        n = await self.engine.ask(FlushCache())
        return worker_pb2.FlushResponse(flushed_pages=n)

    async def Abort(self, request, context):  # noqa: N802
        """Abort a request that is running, or release one held for a pull (prefill)."""
        rid = request.request_id
        found = await self.engine.ask(AbortNow(rid))
        return worker_pb2.AbortResponse(found=found)


async def run_worker_service(
    role: str,
    servicer: EngineWorker,
    add: Callable[[Any, Any], None],
    host: str,
    port: int,
    grace: float,
    stopping: threading.Event,
    cache_service: str = "",
) -> None:
    """Run a worker's gRPC service (strata.v1.<role>) until `stopping` is set; streams in
    flight get `grace` seconds to finish. While it serves, it registers at the cache service
    (discovery). The engine's step loop runs on the process's main thread
    (launch.serve.serve_worker); this stops it when the service ends."""
    name = worker_pb2.DESCRIPTOR.services_by_name[role].full_name
    beats = None
    try:
        server, bound = await start_server(host, port, [(add, servicer, name)])
        log.info("%s worker %s on %s:%d", role.lower(), servicer.worker_id, host, bound)
        if cache_service:
            address = servicer.worker_id
            beats = asyncio.create_task(register(cache_service, address, role.lower(), stopping))
        await run_until_signal(server, grace, stopping)
    finally:
        if beats is not None:
            beats.cancel()
        servicer.engine.stop()


async def register(cache_service: str, address: str, role: str, stopping: threading.Event) -> None:
    """Heartbeats to the cache service's registry every HEARTBEAT_S (its entry lives
    REGISTRY_TTL_S), and a last one with TTL 0 as soon as the worker stops: the gateway
    routes no new request to a worker that drains."""
    stub = cache_pb2_grpc.CacheStub(open_aio_channel(cache_service))
    reachable = True
    while True:
        leaving = stopping.is_set()
        request = cache_pb2.RegisterRequest(
            address=address, role=role, ttl_s=0.0 if leaving else REGISTRY_TTL_S
        )
        try:
            await stub.Register(request, timeout=1.0)
            reachable = True
        except grpc.aio.AioRpcError as exc:
            if reachable:
                log.warning("cannot register at the cache service %s: %s", cache_service, exc)
            reachable = False
        if leaving:
            return
        await asyncio.to_thread(stopping.wait, HEARTBEAT_S)
