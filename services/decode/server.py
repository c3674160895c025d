"""The decode worker: the engine behind `strata.v1.Decode`, its radix tree at the cache
service (RemoteCacheIndex), so the gateway can route each prompt to the worker that holds
its prefix. It prefills prompts itself: prefill workers and KV transfer are not built yet.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing

import grpc

from services.convert import chunk_from_output, params_from_proto
from services.grpcio import start_server
from strata.engine.engine import Engine
from strata.proto.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


class DecodeService(worker_pb2_grpc.DecodeServicer):
    def __init__(self, engine: Engine, worker_id: str) -> None:
        self.engine, self.worker_id = engine, worker_id

    async def Generate(self, request, context):  # noqa: N802 (gRPC method names)
        if request.prefill_worker:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "prefill workers are not built yet")
        ids = list(request.prompt_ids)
        try:
            params = params_from_proto(request.sampling_params)
            await asyncio.to_thread(self.engine.validate, ids, params)  # may compile a grammar
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        # a cancelled call closes the stream, which aborts the request and frees its pages
        async with aclosing(self.engine.stream(ids, params, request.request_id or None)) as evs:
            async for ev in evs:
                yield chunk_from_output(ev)

    async def Load(self, request, context):  # noqa: N802
        s = await asyncio.wrap_future(self.engine.call(self.engine.stats))
        return worker_pb2.LoadResponse(worker=self.worker_id, running=s.running,
                                       waiting=s.waiting, pages_total=s.pages_total,
                                       pages_free=s.pages_free)  # fmt: skip

    async def FlushCache(self, request, context):  # noqa: N802
        n = await asyncio.wrap_future(self.engine.call(self.engine.flush_cache))
        return worker_pb2.FlushResponse(flushed_pages=n)

    async def Abort(self, request, context):  # noqa: N802
        found = request.request_id in self.engine._requests
        self.engine.abort(request.request_id)
        return worker_pb2.AbortResponse(found=found)


async def serve(engine: Engine, worker_id: str, host: str, port: int) -> None:
    name = worker_pb2.DESCRIPTOR.services_by_name["Decode"].full_name
    add = worker_pb2_grpc.add_DecodeServicer_to_server
    engine.start()
    server, bound = await start_server(host, port, [(add, DecodeService(engine, worker_id), name)])
    log.info("decode worker %s on %s:%d", worker_id, host, bound)
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(grace=10)  # in-flight streams get 10 s to finish
        engine.shutdown()
