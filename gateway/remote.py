"""RemoteBackend: the gateway in split mode. Routes each request to the decode worker where
serving it costs least (route_cost: tokens to compute, plus tokens to load from its L2 or
the shared L3 weighted by their measured cost; from the cache service's index), then the
fewest requests in flight from this gateway, then in turn. When that worker would compute
more than `local_prefill_tokens`, a prefill worker chosen the same way computes the prompt
and sends the KV (conditional disaggregation); otherwise the decode worker prefills it.
Without the cache service it routes by load alone. Streams the tokens back (migrating a
stream whose worker fails); /health is gateway.cluster_health's. Who the workers are, and
whether they answer, is gateway.workers.WorkerSet's."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import replace
from typing import Any

import grpc

from gateway.backend import Backend
from gateway.cluster_health import RPC_TIMEOUT, cluster_health
from gateway.workers import WorkerSet
from services.convert import (
    output_from_chunk,
    params_to_proto,
)
from strata.engine.request import (
    Checked,
    Overloaded,
    RequestOutput,
    check_length,
    check_request,
)
from strata.grammar.compiler import LazyGrammarCompiler
from strata.model.spec import ModelSpec
from strata.proto.v1 import cache_pb2, worker_pb2
from strata.sampling.params import SamplingParams

log = logging.getLogger(__name__)

ROUTE_TIMEOUT = 1.0  # a slow cache service must not hold up requests: route by load instead
# loading a token vs computing it, until the workers have measured both
DEFAULT_LOAD_WEIGHTS = {"l2": 0.05, "l3": 0.2}


class _Cut(Exception):
    """A worker's stream ended before its last event. transport: the call failed (the
    worker died, or its stream broke), else the worker reported an error; unreachable: it
    refused the connection before producing anything (not counted as a migration); final:
    not to be tried again (the request's own deadline passed)."""

    def __init__(
        self, target: str, details: str, transport: bool = True, unreachable: bool = False
    ) -> None:
        super().__init__(f"{target}: {details}")
        self.transport, self.unreachable, self.final = transport, unreachable, False


class RemoteBackend(Backend):
    def __init__(
        self,
        tokenizer: Any,
        model_name: str,
        spec: ModelSpec,
        cache_service: str,
        decode_targets: Sequence[str],
        prefill_targets: Sequence[str] = (),
        local_prefill_tokens: int = 256,
        request_timeout: float = 600.0,
        max_per_worker: int | None = None,
        migration_limit: int = 3,
        discovery: str = "static",
    ) -> None:
        """decode_targets, prefill_targets: host:port or dns:NAME:PORT entries; discovery
        "registry": also the workers registered at the cache service (gateway.workers).
        max_per_worker: requests the gateway holds at most per decode worker (running or
        queued there); past it, new ones are refused (Overloaded, HTTP 429).
        migration_limit: how many times a request whose stream was cut goes on on another
        worker before the client gets an error (0: never)."""
        if migration_limit < 0:
            raise ValueError(f"--migration-limit must be >= 0, not {migration_limit}")
        self.tokenizer, self.model_name, self.spec = tokenizer, model_name, spec
        self.workers = WorkerSet(decode_targets, prefill_targets, cache_service, discovery)
        self.local_prefill_tokens = local_prefill_tokens
        self.request_timeout = request_timeout
        self.max_per_worker = max_per_worker
        self.migration_limit = migration_limit
        self.migrated = 0  # streams that went on on another worker
        self._turn = 0
        eos = [tokenizer.eos_token_id, *spec.eos_token_ids]
        self.grammar = LazyGrammarCompiler(tokenizer, spec.vocab_size, eos)

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Checked:
        w = self.workers
        if not w.decode:
            raise Overloaded("no decode worker has registered yet; retry later")
        held = sum(w.inflight.get(t, 0) for t in w.decode)
        if self.max_per_worker is not None and held >= self.max_per_worker * len(w.decode):
            raise Overloaded(
                f"the gateway holds {held} requests, its limit "
                "(workers x (--max-running-requests + --max-queued-requests)); "
                "retry later"
            )
        check_length(len(prompt_ids), self.spec.max_position)
        check_request(
            prompt_ids, params, self.spec.vocab_size, lambda c: self.grammar.get().compile(c)
        )
        return Checked(list(prompt_ids), params)

    async def route(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        avoid: frozenset[str] = frozenset(),
        resumed: bool = False,
    ) -> tuple[str, str]:
        """(decode worker, prefill worker or "" to prefill on the decode worker), among the
        healthy workers not in avoid (among all, if none is). A resumed (migrated) request
        is prefilled on its decode worker."""
        w = self.workers
        try:
            reply = await w.cache().Route(
                cache_pb2.RouteRequest(token_ids=list(prompt_ids)), timeout=ROUTE_TIMEOUT
            )
            held, l3 = dict(reply.workers), reply.l3_tokens
        except grpc.aio.AioRpcError:  # no routing hints: still serve, by load alone
            held, l3 = {}, 0
        cost = {t: route_cost(len(prompt_ids), held.get(t), l3) for t in w.decode + w.prefill}
        self._turn += 1  # equals take turns, so new conversations spread over the workers
        decode = w.pick(w.decode, cost, avoid, self._turn)
        # prompt logprobs are computed where the prompt is prefilled: on the decode worker
        if (
            not w.prefill
            or resumed
            or cost[decode] <= self.local_prefill_tokens
            or params.logprob_start_len >= 0
        ):
            return decode, ""
        return decode, w.pick(w.prefill, cost, avoid, self._turn)

    async def generate(
        self, request: Checked, rid: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        """Route and stream. A worker that cannot be reached before the first token is
        marked down and the request goes to another one. A stream cut after that (the
        worker died, its stream broke, or it reported an error) migrates: another worker
        goes on after the tokens already streamed (they travel as resume_ids), so the
        client's stream continues with no token lost or repeated, up to migration_limit
        times; then, or when no other worker is left, an error event naming the worker."""
        rid = rid or uuid.uuid4().hex
        sent: list[int] = []  # tokens streamed so far
        tried: set[str] = set()
        migrations = 0
        session = request.session
        while True:
            if session is not None:  # on its worker, prefilled there (where it is pinned)
                target, prefill = self._session_worker(session.id)[1], ""
            else:
                target, prefill = await self.route(
                    [*request.prompt_ids, *sent], request.params, frozenset(tried), bool(sent)
                )
            resumed = bool(sent)
            try:
                on = replace(request, session=session)
                async for event in self._generate_on(target, prefill, on, sent, rid):
                    if resumed:  # the client has the prompt's logprobs already
                        event.input_logprobs = None
                    sent.extend(event.token_ids)
                    yield event
                return
            except _Cut as cut:
                session = None  # it lived on that worker: the stream goes on without it
                w = self.workers
                if cut.transport:  # gone or broken: not this worker again for this request
                    tried.add(target)
                    w.healthy[target] = False  # until its health check answers again
                if not cut.unreachable:
                    migrations += 1
                left = [t for t in w.decode if t not in tried and w.healthy.get(t)]
                if cut.final or migrations > self.migration_limit or not left:
                    yield RequestOutput(rid, [], "", finish_reason="error", error=str(cut))
                    return
                self.migrated += not cut.unreachable
                log.warning("%s: request %s goes on elsewhere after %d tokens", cut, rid, len(sent))

    async def _generate_on(
        self,
        target: str,
        prefill: str,
        request: Checked,
        resume: list[int],
        rid: str,
    ) -> AsyncGenerator[RequestOutput, None]:
        """One worker's stream of the request, after the resume tokens; _Cut when it fails
        before its last event."""
        inflight = self.workers.inflight
        call = self.workers.decode_stub(target).Generate(
            worker_pb2.WorkerGenerateRequest(
                request_id=rid,
                prompt_ids=list(request.prompt_ids),
                sampling_params=params_to_proto(request.params),
                prefill_worker=prefill,
                resume_ids=resume,
                session_id=self._session_worker(request.session.id)[0] if request.session else "",
                session_replace=request.session.replace if request.session else False,
            ),
            timeout=self.request_timeout,
        )
        inflight[target] = inflight.get(target, 0) + 1
        if prefill:  # until the first token: the prefill is done by then
            inflight[prefill] = inflight.get(prefill, 0) + 1
        finished = got_any = False
        try:
            async for chunk in call:
                got_any = True
                if prefill:
                    inflight[prefill] -= 1
                    prefill = ""
                event = output_from_chunk(rid, chunk)
                finished = event.finish_reason is not None
                if event.finish_reason == "error":
                    raise _Cut(f"decode worker {target}", event.error or "error", transport=False)
                yield event
            if not finished:
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNKNOWN, None, None, "stream ended")
        except grpc.aio.AioRpcError as exc:
            finished = True
            code = exc.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(exc.details()) from None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise Overloaded(f"decode worker {target}: {exc.details()}") from None
            cut = _Cut(f"decode worker {target}", exc.details() or code.name)
            cut.unreachable = code == grpc.StatusCode.UNAVAILABLE and not got_any
            cut.final = code == grpc.StatusCode.DEADLINE_EXCEEDED  # --request-timeout
            raise cut from None
        finally:
            inflight[target] -= 1
            if prefill:
                inflight[prefill] -= 1
            if not finished:  # the client went away: cancelling aborts it on the worker
                call.cancel()

    async def health(self) -> dict[str, Any]:
        extra = {"migrated_requests": self.migrated}
        return await cluster_health(self.workers, self.model_name, extra)

    # ---- sessions: each lives on one decode worker, named in its id ("ENGINE_ID@worker") ---

    async def open_session(self, ttl: float | None, capacity: int | None) -> str:
        w = self.workers
        if not w.decode:
            raise Overloaded("no decode worker has registered yet; retry later")
        self._turn += 1
        target = w.pick(w.decode, {}, frozenset(), self._turn)
        request = worker_pb2.WorkerOpenSessionRequest(ttl_s=ttl or 0, capacity=capacity or 0)
        reply = await self._session_rpc(target, "OpenSession", request)
        return f"{reply.session_id}@{target}"

    async def close_session(self, sid: str) -> bool:
        engine_sid, target = self._session_worker(sid)
        request = worker_pb2.WorkerCloseSessionRequest(session_id=engine_sid)
        return bool((await self._session_rpc(target, "CloseSession", request)).closed)

    async def session_context(
        self, sid: str, rid: str | None, offset: int | None, new: int
    ) -> list[int]:
        engine_sid, target = self._session_worker(sid)
        request = worker_pb2.SessionContextRequest(
            session_id=engine_sid, rid=rid, offset=offset, new_tokens=new
        )
        return list((await self._session_rpc(target, "SessionContext", request)).token_ids)

    def _session_worker(self, sid: str) -> tuple[str, str]:
        """(the engine's session id, the decode worker that holds it)."""
        engine_sid, _, target = sid.rpartition("@")
        if not engine_sid or target not in self.workers.decode:
            raise ValueError(f"session {sid!r} is not open (its worker is not serving)")
        return engine_sid, target

    async def _session_rpc(self, target: str, method: str, request: Any) -> Any:
        try:
            call = getattr(self.workers.decode_stub(target), method)
            return await call(request, timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise ValueError(f"decode worker {target}: {exc.details()}") from None

    async def abort(self, rid: str) -> bool:
        request = worker_pb2.AbortRequest(request_id=rid)
        replies = await self._each_worker(lambda s: s.Abort(request, timeout=RPC_TIMEOUT))
        return any(r.found for r in replies)

    async def server_info(self) -> dict[str, Any]:
        health = await self.health()
        return {
            "model_path": self.model_name,
            "decode_workers": self.workers.decode,
            "prefill_workers": self.workers.prefill,
            "discovery": self.workers.discovery,
            "memory": {w["worker"]: w.get("memory") for w in health["workers"]},
        }

    async def flush_cache(self) -> int:
        request = worker_pb2.FlushRequest()
        replies = await self._each_worker(lambda s: s.FlushCache(request, timeout=RPC_TIMEOUT))
        return sum(r.flushed_pages for r in replies)

    async def _each_worker(self, call: Any) -> list[Any]:
        """call(stub) on every worker at once; the replies of those that answered."""
        w = self.workers
        stubs = [*map(w.decode_stub, w.decode), *map(w.prefill_stub, w.prefill)]
        replies = await asyncio.gather(*(call(s) for s in stubs), return_exceptions=True)
        return [r for r in replies if not isinstance(r, BaseException)]


def route_cost(prompt_len: int, held: Any, l3_tokens: int) -> float:
    """What serving a prompt on a worker costs, in prefill tokens: the tokens it must compute,
    plus the tokens it must load from L2 and from L3, each weighted by its measured cost
    of loading a token relative to computing one (defaults until measured)."""
    l1 = held.l1_tokens if held is not None else 0
    l2 = held.l2_tokens if held is not None else 0
    reach = max(l2, l3_tokens)
    weights = dict(DEFAULT_LOAD_WEIGHTS)
    if held is not None and held.costs.compute_token > 0 and held.page_size:
        per_token = held.costs.compute_token * held.page_size
        for tier in ("l2", "l3"):
            measured = getattr(held.costs, f"{tier}_page")
            if measured > 0:
                weights[tier] = measured / per_token
    return (prompt_len - reach) + (l2 - l1) * weights["l2"] + max(0, l3_tokens - l2) * weights["l3"]
