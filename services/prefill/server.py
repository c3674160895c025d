"""The prefill worker: the engine behind `strata.v1.Prefill`, its radix tree at the cache
service. Prefill computes a prompt's uncached suffix and samples the first token, then holds
the prompt's pages; Pull sends them to the decode worker over the pair's KV channel and
releases them (to the cache). Connect makes that channel: this side opens a store on a
free port and joins it from a thread, while the decode worker joins from its side.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import replace
from typing import Any

import grpc

from services.convert import params_from_proto
from services.worker import EngineWorker, run_worker_service
from strata.engine.engine import Engine
from strata.kv.pool import KVCache
from strata.kv.transfer import (
    KVChannel,
    Listen,
    RankedChannel,
    TransferError,
    TransferStats,
    kv_layout,
    listen,
)
from strata.proto.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


class PrefillService(EngineWorker, worker_pb2_grpc.PrefillServicer):
    def __init__(self, engine: Engine, worker_id: str) -> None:
        super().__init__(engine, worker_id)
        # channel id -> the joined channel (with tensor parallelism, of every rank)
        self.channels: dict[str, Future[KVChannel | RankedChannel]] = {}
        self._joins = ThreadPoolExecutor(8, thread_name_prefix="strata-kv-join")

    async def Connect(self, request, context):  # noqa: N802 (gRPC method names)
        runner = self.engine.runner
        layout = kv_layout(runner.kv, runner.tp_size)
        if request.kv_layout != layout:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"KV layout {request.kv_layout!r} does not match this prefill worker's "
                f"{layout!r} (same model, dtype, page size and --tp-size?)",
            )
        timeout = request.timeout_s or 30.0
        store = await asyncio.to_thread(listen, timeout)
        cid = uuid.uuid4().hex
        rank_ports: list[int] = []
        if runner.links is not None:  # each other rank opens a store for its peer rank
            try:
                rank_ports = await asyncio.to_thread(
                    lambda: [f.result(timeout) for f in runner.links.call(Listen(cid, timeout))]
                )
            except Exception as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"tensor-parallel rank: {exc}")
        self.channels[cid] = self._joins.submit(self._join, runner.kv, store, timeout, cid)
        log.info("KV channel %s to %s on port %d", cid[:8], request.decode_worker, store.port)
        backend = "nccl" if runner.kv.data.is_cuda else "gloo"
        return worker_pb2.ConnectResponse(
            channel_id=cid, port=store.port, backend=backend, rank_ports=rank_ports
        )

    def _join(self, kv: KVCache, store: Any, timeout: float, cid: str) -> KVChannel | RankedChannel:
        own = KVChannel(kv, "", 0, rank=0, timeout=timeout, store=store)
        links = self.engine.runner.links
        return own if links is None else RankedChannel(own, cid, links)

    async def Prefill(self, request, context):  # noqa: N802
        ids = list(request.prompt_ids)
        try:
            params = params_from_proto(request.sampling_params)
            # once, here (it may compile a grammar); the engine trusts the Checked request
            checked = await asyncio.to_thread(self.engine.validate, ids, params)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        expected = self.engine.runner.pages_for(len(ids))
        if request.num_pages != expected:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{request.num_pages} pages reserved for a prompt of {len(ids)} "
                f"tokens; this worker sends {expected}",
            )
        # one token: the decode worker samples the rest; a cancelled call aborts the prefill
        one = replace(checked, params=replace(params, max_new_tokens=1))
        last = None
        async with aclosing(self.engine.stream(one, request.request_id, hold=True)) as evs:
            async for ev in evs:
                last = ev
        if last is None or last.finish_reason not in ("stop", "length") or not last.token_ids:
            await context.abort(grpc.StatusCode.ABORTED, last.error or "prefill aborted")
        u = last.usage
        reply = worker_pb2.PrefillResponse(
            first_token=last.token_ids[0],
            cached_tokens=u.cached_tokens if u else 0,
            top_logprobs=(last.top_logprobs or [{}])[0],
            l2_tokens=u.l2_tokens if u else 0,
            l3_tokens=u.l3_tokens if u else 0,
        )
        if last.logprobs:
            reply.logprob = last.logprobs[0]
        return reply

    async def Pull(self, request, context):  # noqa: N802
        """Stream `ready` (the held pages are there), send them, then stream the figures.
        The decode worker posts its receive only after `ready`, so a refused pull never
        leaves a receive waiting on the channel."""
        rid = request.request_id
        joined = self.channels.get(request.channel_id)
        if joined is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown KV channel: connect again")
        try:
            pages = await asyncio.wrap_future(self.engine.call(lambda: self.engine.held_pages(rid)))
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no held pages for request {rid}")
        try:
            channel = await asyncio.wrap_future(joined)
            yield worker_pb2.PullResponse()
            stats = await asyncio.to_thread(self._send, channel, pages)
        except TransferError as exc:
            self.channels.pop(request.channel_id, None)  # out of step: the peer reconnects
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        finally:
            self.engine.call(lambda: self.engine.release_held(rid))
        self.transferred.add(stats.bytes, stats.seconds)
        yield worker_pb2.PullResponse(transfer_bytes=stats.bytes, transfer_seconds=stats.seconds)

    @staticmethod
    def _send(channel: KVChannel | RankedChannel, pages: list[int]) -> TransferStats:
        with channel.lock:
            return channel.send(pages)


async def serve(
    engine: Engine,
    worker_id: str,
    host: str,
    port: int,
    grace: float,
    stopping: threading.Event,
    cache_service: str = "",
) -> None:
    add = worker_pb2_grpc.add_PrefillServicer_to_server
    service = PrefillService(engine, worker_id)
    await run_worker_service("Prefill", service, add, host, port, grace, stopping, cache_service)
