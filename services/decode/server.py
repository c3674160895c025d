"""The decode worker: the engine behind `strata.v1.Decode`, its radix tree at the cache
service (RemoteCacheIndex), so the gateway can route each prompt to the worker that holds
its prefix. A request naming a prefill worker has its pages reserved here first; then the
prefill worker computes the prompt and its pages arrive over the pair's KV channel
(`PrefillPeers`). Without one, this worker prefills the prompt itself.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import aclosing, suppress
from dataclasses import replace

import grpc

from services.convert import chunk_from_output, params_from_proto, params_to_proto
from services.grpcio import open_channel
from services.worker import EngineWorker, TransferCounter, run_worker_service
from strata.engine.engine import Engine
from strata.engine.messages import CloseSession, OpenSession, SessionContext
from strata.engine.request import Overloaded, RemoteFill, SessionRef
from strata.engine.tp_rank import RankLinks
from strata.kv.pool import KVCache
from strata.kv.transfer import Join, KVChannel, RankedChannel, TransferError, kv_layout
from strata.proto.v1 import worker_pb2, worker_pb2_grpc
from strata.sampling.params import SamplingParams


class PrefillAborted(RuntimeError):
    """The request was aborted while its prefill ran remotely."""


class PrefillPeers:
    """The decode side of split mode: one gRPC stub and one KV channel per prefill worker.
    `fetch` runs on an engine fetch thread (it blocks); a failed transfer drops the channel,
    and the next request to that worker connects again."""

    def __init__(
        self,
        kv: KVCache,
        worker_id: str,
        counter: TransferCounter,
        timeout: float = 30.0,
        prefill_timeout: float = 600.0,
        tp_size: int = 1,
        links: RankLinks | None = None,
    ) -> None:
        """tp_size, links: with tensor parallelism, the size and the links to ranks 1.. (each
        rank receives its own KV heads over a channel of its own)."""
        self.kv, self.worker_id, self.timeout, self.counter = kv, worker_id, timeout, counter
        self.tp_size, self.links = tp_size, links
        self.prefill_timeout = prefill_timeout  # the prefill itself may queue behind others
        self._stubs: dict[str, worker_pb2_grpc.PrefillStub] = {}
        self._channels: dict[str, tuple[KVChannel | RankedChannel, str]] = {}
        self._lock = threading.Lock()  # guards the two dicts and serializes handshakes

    def stub(self, target: str) -> worker_pb2_grpc.PrefillStub:
        with self._lock:
            if target not in self._stubs:
                self._stubs[target] = worker_pb2_grpc.PrefillStub(open_channel(target))
            return self._stubs[target]

    def channel(self, target: str) -> tuple[KVChannel | RankedChannel, str]:
        """The pair's channel and its id, made by a Connect handshake on first use."""
        with self._lock:
            if target in self._channels:
                return self._channels[target]
            stub = self._stubs[target]
            try:
                reply = stub.Connect(
                    worker_pb2.ConnectRequest(
                        decode_worker=self.worker_id,
                        kv_layout=kv_layout(self.kv, self.tp_size),
                        timeout_s=self.timeout,
                    ),
                    timeout=self.timeout,
                )
            except grpc.RpcError as exc:
                raise TransferError(f"KV channel to {target}: {exc.details()}") from None
            host = target.rsplit(":", 1)[0]
            cid = reply.channel_id
            if self.links is None:
                channel: KVChannel | RankedChannel = KVChannel(
                    self.kv, host, reply.port, rank=1, timeout=self.timeout
                )
            else:
                channel = self._join_ranks(host, reply, self.links)
            self._channels[target] = (channel, cid)
            return self._channels[target]

    def _join_ranks(
        self, host: str, reply: worker_pb2.ConnectResponse, links: RankLinks
    ) -> RankedChannel:
        """Every rank joins its peer rank's store (the others from their processes)."""
        cid, ports = reply.channel_id, list(reply.rank_ports)
        if len(ports) != links.size:
            raise TransferError(
                f"the prefill worker has {len(ports) + 1} tensor-parallel "
                f"ranks, this decode worker {links.size + 1}"
            )
        joins = links.call_each([Join(cid, host, p, self.timeout) for p in ports])
        own = KVChannel(self.kv, host, reply.port, rank=1, timeout=self.timeout)
        channel = RankedChannel(own, cid, links)
        try:
            for f in joins:
                f.result(timeout=self.timeout)
        except Exception as exc:
            channel.close()
            raise TransferError(f"KV channel of another rank: {exc}") from None
        return channel

    def drop(self, target: str) -> None:
        with self._lock:
            self._channels.pop(target, None)

    def fetch(
        self,
        target: str,
        rid: str,
        prompt_ids: list[int],
        params: SamplingParams,
        pages: list[int],
        cancel: threading.Event,
    ) -> RemoteFill:
        stub = self.stub(target)
        call = stub.Prefill.future(
            worker_pb2.PrefillRequest(
                request_id=rid,
                prompt_ids=prompt_ids,
                sampling_params=params_to_proto(params),
                num_pages=len(pages),
            ),
            timeout=self.prefill_timeout,
        )
        while not call.done():  # poll, so an abort here cancels the remote prefill at once
            if cancel.wait(0.02):
                call.cancel()
                raise PrefillAborted(rid)
        try:
            reply = call.result()
        except grpc.RpcError as exc:
            raise TransferError(f"prefill worker {target}: {exc.details()}") from None
        try:
            if cancel.is_set():
                raise PrefillAborted(rid)
            channel, cid = self.channel(target)
            stats = self._pull(stub, target, channel, cid, rid, pages)
        except BaseException:
            self._release_remote(stub, rid)  # best effort: its TTL frees it otherwise
            raise
        self.counter.add(stats.transfer_bytes, stats.transfer_seconds)
        return RemoteFill(
            reply.first_token,
            reply.cached_tokens,
            logprob=reply.logprob if reply.HasField("logprob") else None,
            top_logprobs=dict(reply.top_logprobs) or None,
            transfer_bytes=stats.transfer_bytes,
            transfer_seconds=stats.transfer_seconds,
            l2_tokens=reply.l2_tokens,
            l3_tokens=reply.l3_tokens,
        )

    def _pull(
        self,
        stub: worker_pb2_grpc.PrefillStub,
        target: str,
        channel: KVChannel | RankedChannel,
        cid: str,
        rid: str,
        pages: list[int],
    ) -> worker_pb2.PullResponse:
        with channel.lock:  # one transfer at a time per channel, in the same order both sides
            replies = stub.Pull(
                worker_pb2.PullRequest(request_id=rid, channel_id=cid), timeout=self.timeout
            )
            try:
                next(replies)  # ready: the sender is about to send
            except grpc.RpcError as exc:  # refused before any byte moved: channel intact
                if exc.code() == grpc.StatusCode.NOT_FOUND and "channel" in (exc.details() or ""):
                    self.drop(target)
                raise TransferError(f"prefill worker {target}: {exc.details()}") from None
            try:
                channel.recv(pages)
                return next(replies)
            except (TransferError, grpc.RpcError, StopIteration) as exc:
                self.drop(target)  # out of step: the next request connects again
                replies.cancel()
                detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                raise TransferError(f"KV transfer from {target} failed: {detail}") from None

    def _release_remote(self, stub: worker_pb2_grpc.PrefillStub, rid: str) -> None:
        with suppress(grpc.RpcError):
            stub.Abort(worker_pb2.AbortRequest(request_id=rid), timeout=5)


class DecodeService(EngineWorker, worker_pb2_grpc.DecodeServicer):
    def __init__(self, engine: Engine, worker_id: str, transfer_timeout: float = 30.0) -> None:
        super().__init__(engine, worker_id)
        runner = engine.runner
        self.peers = PrefillPeers(
            runner.kv,
            worker_id,
            self.transferred,
            transfer_timeout,
            tp_size=runner.tp_size,
            links=runner.links,
        )

    async def Generate(self, request, context):  # noqa: N802 (gRPC method names)
        ids, resume = list(request.prompt_ids), list(request.resume_ids)
        try:
            params = params_from_proto(request.sampling_params)
            if resume and request.prefill_worker:
                raise ValueError("a resumed request is prefilled here: name no prefill worker")
            # once, here (it may compile a grammar); the engine trusts the Checked request.
            # Resumed tokens are checked with the prompt (ids, length), then split off.
            checked = await asyncio.to_thread(self.engine.validate, ids + resume, params)
            if resume:
                checked = checked.resumed(len(ids))
            if request.session_id:
                checked = replace(
                    checked, session=SessionRef(request.session_id, request.session_replace)
                )
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Overloaded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        rid = request.request_id or None
        source = None
        if request.prefill_worker and rid is not None:
            target = request.prefill_worker

            def source(pages: list[int], cancel: threading.Event) -> RemoteFill:
                return self.peers.fetch(target, rid, ids, params, pages, cancel)

        # a cancelled call closes the stream, which aborts the request and frees its pages
        try:
            async with aclosing(self.engine.stream(checked, rid, kv_source=source)) as evs:
                async for ev in evs:
                    yield chunk_from_output(ev)
        except ValueError as exc:  # queued with resumed tokens its grammar refuses
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def OpenSession(self, request, context):  # noqa: N802
        query = OpenSession(request.ttl_s or None, request.capacity or None)
        sid = await self._session_call(query, context)
        return worker_pb2.WorkerOpenSessionResponse(session_id=sid)

    async def CloseSession(self, request, context):  # noqa: N802
        closed = await self.engine.ask(CloseSession(request.session_id))
        return worker_pb2.WorkerCloseSessionResponse(closed=closed)

    async def SessionContext(self, request, context):  # noqa: N802
        rid = request.rid if request.HasField("rid") else None
        offset = request.offset if request.HasField("offset") else None
        query = SessionContext(request.session_id, rid, offset, request.new_tokens)
        ids = await self._session_call(query, context)
        return worker_pb2.SessionContextResponse(token_ids=ids)

    async def _session_call(self, query, context):
        try:
            return await self.engine.ask(query)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


async def serve(
    engine: Engine,
    worker_id: str,
    host: str,
    port: int,
    grace: float,
    stopping: threading.Event,
    cache_service: str = "",
) -> None:
    add = worker_pb2_grpc.add_DecodeServicer_to_server
    service = DecodeService(engine, worker_id)
    await run_worker_service("Decode", service, add, host, port, grace, stopping, cache_service)
