"""RemoteBackend: the gateway in split mode. Routes each request to the decode worker that
holds the longest prefix of its prompt (ties: fewest requests in flight from this gateway,
then in turn),
streams its tokens back, and aggregates every worker's health."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import grpc

from gateway.backend import Backend, radix_cache_stats
from services.convert import output_from_chunk, params_to_proto, tree_stats_from_proto
from strata.engine.engine import check_request
from strata.engine.request import RequestOutput
from strata.engine.runner import check_length
from strata.grammar.compiler import LazyGrammarCompiler
from strata.model.spec import ModelSpec
from strata.proto.v1 import cache_pb2, cache_pb2_grpc, worker_pb2, worker_pb2_grpc
from strata.radix.tree import TreeStats
from strata.sampling.params import SamplingParams

RPC_TIMEOUT = 10.0


class RemoteBackend(Backend):
    def __init__(
        self,
        tokenizer: Any,
        model_name: str,
        spec: ModelSpec,
        cache_target: str,
        decode_targets: Sequence[str],
        request_timeout: float = 600.0,
    ) -> None:
        if not decode_targets:
            raise ValueError("the gateway needs at least one decode worker")
        self.tokenizer, self.model_name, self.spec = tokenizer, model_name, spec
        self.cache_target, self.decode_targets = cache_target, list(decode_targets)
        self.request_timeout = request_timeout
        self.inflight = dict.fromkeys(self.decode_targets, 0)
        self._turn = 0
        self._stubs: tuple[cache_pb2_grpc.CacheStub, dict[str, Any]] | None = None
        eos = [tokenizer.eos_token_id, *spec.eos_token_ids]
        self.grammar = LazyGrammarCompiler(tokenizer, spec.vocab_size, eos)

    # aio channels belong to the event loop that first uses them: made on first use
    def stubs(self) -> tuple[cache_pb2_grpc.CacheStub, dict[str, worker_pb2_grpc.DecodeStub]]:
        if self._stubs is None:
            cache = cache_pb2_grpc.CacheStub(grpc.aio.insecure_channel(self.cache_target))
            decode = {t: worker_pb2_grpc.DecodeStub(grpc.aio.insecure_channel(t))
                      for t in self.decode_targets}  # fmt: skip
            self._stubs = (cache, decode)
        return self._stubs

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        check_length(len(prompt_ids), self.spec.max_position)
        check_request(
            prompt_ids, params, self.spec.vocab_size, lambda c: self.grammar.get().compile(c)
        )

    async def route(self, prompt_ids: Sequence[int]) -> str:
        cache, _ = self.stubs()
        try:
            route = await cache.Route(
                cache_pb2.RouteRequest(token_ids=list(prompt_ids)), timeout=RPC_TIMEOUT
            )
            cached = dict(route.cached_tokens)
        except grpc.aio.AioRpcError:  # no routing hints: still serve, by load alone
            cached = {}
        score = {t: (cached.get(t, 0), -self.inflight[t]) for t in self.decode_targets}
        best = max(score.values())
        ties = [t for t in self.decode_targets if score[t] == best]
        self._turn += 1  # equals take turns, so new conversations spread over the workers
        return ties[self._turn % len(ties)]

    async def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, rid: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        rid = rid or uuid.uuid4().hex
        target = await self.route(prompt_ids)
        _, decode = self.stubs()
        request = worker_pb2.WorkerGenerateRequest(
            request_id=rid, prompt_ids=list(prompt_ids), sampling_params=params_to_proto(params)
        )
        self.inflight[target] += 1
        call = decode[target].Generate(request, timeout=self.request_timeout)
        finished = False
        try:
            async for chunk in call:
                event = output_from_chunk(rid, chunk)
                finished = event.finish_reason is not None
                yield event
            if not finished:
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNKNOWN, None, None, "stream ended")
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(exc.details()) from None
            finished = True
            yield RequestOutput(rid, [], "", finish_reason="error",
                                error=f"decode worker {target}: {exc.details()}")  # fmt: skip
        finally:
            self.inflight[target] -= 1
            if not finished:  # the client went away: cancelling aborts it on the worker
                call.cancel()

    async def health(self) -> dict[str, Any]:
        cache, decode = self.stubs()

        async def worker(target: str) -> tuple[dict[str, Any], TreeStats | None]:
            try:
                load = await decode[target].Load(worker_pb2.LoadRequest(), timeout=RPC_TIMEOUT)
                reply = await cache.Stats(cache_pb2.WorkerRequest(worker=target),
                                          timeout=RPC_TIMEOUT)  # fmt: skip
            except grpc.aio.AioRpcError as exc:
                return {"worker": target, "status": "unreachable", "error": exc.details()}, None
            stats = tree_stats_from_proto(reply)
            return {"worker": target, "status": "ok", "role": "decode",
                    "running_requests": load.running, "waiting_requests": load.waiting,
                    "pages_total": load.pages_total, "pages_free": load.pages_free,
                    "radix_cache_stats": radix_cache_stats(stats)}, stats  # fmt: skip

        replies = await asyncio.gather(*(worker(t) for t in self.decode_targets))
        workers = [info for info, _ in replies]
        ok = [info for info, stats in replies if stats is not None]
        total = sum_stats([stats for _, stats in replies if stats is not None])
        return {
            "status": "ok" if len(ok) == len(workers) else "degraded",
            "model": self.model_name,
            "running_requests": sum(w["running_requests"] for w in ok),
            "waiting_requests": sum(w["waiting_requests"] for w in ok),
            "pages_total": sum(w["pages_total"] for w in ok),
            "pages_free": sum(w["pages_free"] for w in ok),
            "radix_cache_stats": radix_cache_stats(total),
            "workers": workers,
        }

    async def flush_cache(self) -> int:
        _, decode = self.stubs()
        replies = await asyncio.gather(*(d.FlushCache(worker_pb2.FlushRequest(),
                                                      timeout=RPC_TIMEOUT)
                                         for d in decode.values()))  # fmt: skip
        return sum(r.flushed_pages for r in replies)


def sum_stats(stats: list[TreeStats]) -> TreeStats:
    """The cluster's view: counts add up; rates are recomputed from the sums."""
    prompt = sum(s.prompt_tokens for s in stats)
    cached = sum(s.cached_tokens for s in stats)
    shared = sum(s.shared_prefix_count for s in stats)
    depth = sum(s.avg_sharing_depth * s.shared_prefix_count for s in stats)
    return TreeStats(
        total_nodes=sum(s.total_nodes for s in stats),
        cached_pages=sum(s.cached_pages for s in stats),
        locked_pages=sum(s.locked_pages for s in stats),
        shared_prefix_count=shared,
        avg_sharing_depth=depth / shared if shared else 0.0,
        hit_rate=cached / prompt if prompt else 0.0,
        prompt_tokens=prompt,
        cached_tokens=cached,
    )
