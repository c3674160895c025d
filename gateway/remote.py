"""RemoteBackend: the gateway in split mode. Routes each request to the decode worker that
holds the longest prefix of its prompt (ties: fewest requests in flight from this gateway,
then in turn). When the part of the prompt that decode worker lacks is longer than
`local_prefill_tokens`, a prefill worker chosen the same way computes it and sends the KV
(conditional disaggregation); otherwise the decode worker prefills it. Streams the tokens
back and aggregates every worker's health."""

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
        prefill_targets: Sequence[str] = (),
        local_prefill_tokens: int = 256,
        request_timeout: float = 600.0,
    ) -> None:
        if not decode_targets:
            raise ValueError("the gateway needs at least one decode worker")
        self.tokenizer, self.model_name, self.spec = tokenizer, model_name, spec
        self.cache_target, self.decode_targets = cache_target, list(decode_targets)
        self.prefill_targets = list(prefill_targets)
        self.local_prefill_tokens = local_prefill_tokens
        self.request_timeout = request_timeout
        self.inflight = dict.fromkeys(self.decode_targets + self.prefill_targets, 0)
        self._turn = 0
        self._stubs: tuple[cache_pb2_grpc.CacheStub, dict[str, Any], dict[str, Any]] | None = None
        eos = [tokenizer.eos_token_id, *spec.eos_token_ids]
        self.grammar = LazyGrammarCompiler(tokenizer, spec.vocab_size, eos)

    # aio channels belong to the event loop that first uses them: made on first use
    def stubs(
        self,
    ) -> tuple[cache_pb2_grpc.CacheStub, dict[str, worker_pb2_grpc.DecodeStub],
               dict[str, worker_pb2_grpc.PrefillStub]]:  # fmt: skip
        if self._stubs is None:
            cache = cache_pb2_grpc.CacheStub(grpc.aio.insecure_channel(self.cache_target))
            decode = {t: worker_pb2_grpc.DecodeStub(grpc.aio.insecure_channel(t))
                      for t in self.decode_targets}  # fmt: skip
            prefill = {t: worker_pb2_grpc.PrefillStub(grpc.aio.insecure_channel(t))
                       for t in self.prefill_targets}  # fmt: skip
            self._stubs = (cache, decode, prefill)
        return self._stubs

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        check_length(len(prompt_ids), self.spec.max_position)
        check_request(
            prompt_ids, params, self.spec.vocab_size, lambda c: self.grammar.get().compile(c)
        )

    async def route(self, prompt_ids: Sequence[int], params: SamplingParams) -> tuple[str, str]:
        """(decode worker, prefill worker or "" to prefill on the decode worker)."""
        cache = self.stubs()[0]
        try:
            route = await cache.Route(
                cache_pb2.RouteRequest(token_ids=list(prompt_ids)), timeout=RPC_TIMEOUT
            )
            cached = dict(route.cached_tokens)
        except grpc.aio.AioRpcError:  # no routing hints: still serve, by load alone
            cached = {}
        decode = self._pick(self.decode_targets, cached)
        missing = len(prompt_ids) - cached.get(decode, 0)
        # prompt logprobs are computed where the prompt is prefilled: on the decode worker
        if (not self.prefill_targets or missing <= self.local_prefill_tokens
                or params.logprob_start_len >= 0):  # fmt: skip
            return decode, ""
        return decode, self._pick(self.prefill_targets, cached)

    def _pick(self, targets: list[str], cached: dict[str, int]) -> str:
        score = {t: (cached.get(t, 0), -self.inflight[t]) for t in targets}
        best = max(score.values())
        ties = [t for t in targets if score[t] == best]
        self._turn += 1  # equals take turns, so new conversations spread over the workers
        return ties[self._turn % len(ties)]

    async def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, rid: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        rid = rid or uuid.uuid4().hex
        target, prefill = await self.route(prompt_ids, params)
        decode = self.stubs()[1]
        request = worker_pb2.WorkerGenerateRequest(
            request_id=rid, prompt_ids=list(prompt_ids), sampling_params=params_to_proto(params),
            prefill_worker=prefill,
        )  # fmt: skip
        self.inflight[target] += 1
        if prefill:
            self.inflight[prefill] += 1  # until the first token: the prefill is done by then
        call = decode[target].Generate(request, timeout=self.request_timeout)
        finished = False
        try:
            async for chunk in call:
                if prefill:
                    self.inflight[prefill] -= 1
                    prefill = ""
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
            if prefill:
                self.inflight[prefill] -= 1
            if not finished:  # the client went away: cancelling aborts it on the worker
                call.cancel()

    async def health(self) -> dict[str, Any]:
        cache, decode, prefill = self.stubs()

        async def worker(target: str, role: str, stub: Any) -> tuple[dict[str, Any], Any]:
            try:
                load = await stub.Load(worker_pb2.LoadRequest(), timeout=RPC_TIMEOUT)
                reply = await cache.Stats(cache_pb2.WorkerRequest(worker=target),
                                          timeout=RPC_TIMEOUT)  # fmt: skip
            except grpc.aio.AioRpcError as exc:
                return {"worker": target, "role": role, "status": "unreachable",
                        "error": exc.details()}, None  # fmt: skip
            stats = tree_stats_from_proto(reply)
            info = {"worker": target, "status": "ok", "role": role,
                    "running_requests": load.running, "waiting_requests": load.waiting,
                    "pages_total": load.pages_total, "pages_free": load.pages_free,
                    "radix_cache_stats": radix_cache_stats(stats),
                    "kv_transfer": transfer_json(load.transfers, load.transfer_bytes,
                                                 load.transfer_seconds)}  # fmt: skip
            if role == "prefill":
                info["held_requests"] = load.held_requests
            return info, (stats, load)

        replies = await asyncio.gather(
            *(worker(t, "decode", decode[t]) for t in self.decode_targets),
            *(worker(t, "prefill", prefill[t]) for t in self.prefill_targets),
        )
        workers = [info for info, _ in replies]
        ok = [(info, got) for info, got in replies if got is not None]
        received = [load for info, (_, load) in ok if info["role"] == "decode"]
        return {
            "status": "ok" if len(ok) == len(workers) else "degraded",
            "model": self.model_name,
            "running_requests": sum(i["running_requests"] for i, _ in ok if i["role"] == "decode"),
            "waiting_requests": sum(i["waiting_requests"] for i, _ in ok if i["role"] == "decode"),
            "pages_total": sum(i["pages_total"] for i, _ in ok),
            "pages_free": sum(i["pages_free"] for i, _ in ok),
            "radix_cache_stats": radix_cache_stats(sum_stats([stats for _, (stats, _) in ok])),
            "kv_transfer": transfer_json(
                sum(r.transfers for r in received),
                sum(r.transfer_bytes for r in received),
                sum(r.transfer_seconds for r in received),
            ),  # fmt: skip
            "workers": workers,
        }

    async def flush_cache(self) -> int:
        _, decode, prefill = self.stubs()
        stubs = [*decode.values(), *prefill.values()]
        replies = await asyncio.gather(
            *(d.FlushCache(worker_pb2.FlushRequest(), timeout=RPC_TIMEOUT) for d in stubs)
        )
        return sum(r.flushed_pages for r in replies)


def transfer_json(transfers: int, nbytes: int, seconds: float) -> dict[str, Any]:
    return {"transfers": transfers, "bytes": nbytes, "seconds": round(seconds, 6),
            "gb_per_s": round(nbytes / seconds / 1e9, 3) if seconds else 0.0}  # fmt: skip


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
