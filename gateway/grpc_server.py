"""The gateway's gRPC front: `strata.v1.Gateway` over the same Backend as the REST API.

Translation only: protobuf in (services/convert.py), the backend's validation and core
calls, protobuf out. Bad input is INVALID_ARGUMENT; a cancelled call aborts its request, which
frees its pages. Every server also has standard health checking and reflection.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing

import grpc

from gateway.backend import Backend
from gateway.front import Front
from gateway.metrics import Metrics
from gateway.protocol import SessionParams
from services.convert import FINISH, chunk_from_output, params_from_proto
from services.grpcio import ApiKeyInterceptor, start_server
from strata.engine.request import Checked, Overloaded, RequestOutput
from strata.proto.v1 import gateway_pb2, gateway_pb2_grpc


class GatewayService(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, backend: Backend, metrics: Metrics | None = None) -> None:
        self.backend = backend
        self.front = Front(backend, metrics or Metrics())

    def _prompt(self, req: gateway_pb2.GenerateRequest) -> list[int]:
        which = req.WhichOneof("input")
        if which == "text":
            return self.front.encode(req.text)
        if which == "token_ids":
            return list(req.token_ids.ids)
        if which == "messages":
            msgs = [{"role": m.role, "content": m.content} for m in req.messages.messages]
            return self.front.chat_prompt(msgs)
        raise ValueError("give text, token_ids or messages")

    async def _start(
        self, req: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> Checked:
        try:
            ids, session = self._prompt(req), None
            if req.HasField("session_params"):
                sp = req.session_params
                params = SessionParams(
                    id=sp.id,
                    rid=sp.rid if sp.HasField("rid") else None,
                    offset=sp.offset if sp.HasField("offset") else None,
                    replace=sp.replace,
                )
                whole = req.WhichOneof("input") == "messages"
                ids, session = await self.front.in_session(params, ids, whole)
            return await self.front.validate(ids, params_from_proto(req.sampling_params), session)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Overloaded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        raise AssertionError("context.abort raises")

    async def _events(
        self, req: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[RequestOutput, None]:
        request = await self._start(req, context)
        rid = req.request_id or uuid.uuid4().hex
        # aclosing: a cancelled call closes the stream at once, which aborts the request
        async with aclosing(self.front.events(request, "grpc", rid)) as events:
            async for ev in events:
                yield ev

    async def Generate(self, request, context):  # noqa: N802 (gRPC method names)
        checked = await self._start(request, context)
        run = await self.front.collect(checked, "grpc", request.request_id or None)
        if run.failed:
            await context.abort(grpc.StatusCode.INTERNAL, run.error)
        last = run.last
        return gateway_pb2.GenerateResponse(
            request_id=request.request_id or last.rid,
            text=run.text,
            token_ids=run.token_ids,
            finish_reason=FINISH[last.finish_reason],
            usage=chunk_from_output(last).usage,
            logprobs=[lp for _, lp, _ in run.logprobs],
        )

    async def GenerateStream(self, request, context):  # noqa: N802
        async with aclosing(self._events(request, context)) as events:
            async for ev in events:
                chunk = chunk_from_output(ev)
                yield gateway_pb2.GenerateStreamResponse(request_id=ev.rid, chunk=chunk)

    async def OpenSession(self, request, context):  # noqa: N802
        try:
            sid = await self.backend.open_session(
                request.timeout_s or None, request.capacity_of_str_len or None
            )
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Overloaded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        return gateway_pb2.OpenSessionResponse(session_id=sid)

    async def CloseSession(self, request, context):  # noqa: N802
        try:
            closed = await self.backend.close_session(request.session_id)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not closed:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"session {request.session_id!r} is not open"
            )
        return gateway_pb2.CloseSessionResponse()

    async def HealthStats(self, request, context):  # noqa: N802
        return gateway_pb2.HealthStatsResponse(json=json.dumps(await self.backend.health()))


async def start_grpc(
    backend: Backend,
    host: str,
    port: int,
    api_key: str | None = None,
    protect_health: bool = False,
    metrics: Metrics | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start the Gateway service with health and reflection (and, with api_key, its check);
    returns (server, bound port)."""
    name = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
    servicer = GatewayService(backend, metrics)
    interceptors = [ApiKeyInterceptor(api_key, protect_health)] if api_key else []
    return await start_server(
        host,
        port,
        [(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer, name)],
        interceptors,
        internal=False,
    )
