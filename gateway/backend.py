"""Backend: what the REST layer talks to. LocalBackend fronts the engine process."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Sequence
from dataclasses import asdict
from typing import Any

from strata.config import SchedulerConfig
from strata.engine.messages import (
    AbortNow,
    CloseSession,
    FlushCache,
    OpenSession,
    SessionContext,
    Stats,
)
from strata.engine.process import EngineClient, EngineGone
from strata.engine.request import Checked, RequestOutput
from strata.sampling.params import SamplingParams


class Backend(ABC):
    """Runs generations for the gateway (an in-process engine, or remote workers)."""

    tokenizer: Any
    model_name: str

    @abstractmethod
    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Checked:
        """The request, checked once for all that serve it; ValueError for a request that
        can never run, Overloaded while the backend holds as many as it may."""

    @abstractmethod
    def generate(
        self, request: Checked, rid: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream events until one has a finish_reason. Closing the iterator early aborts
        the request and frees its pages."""

    @abstractmethod
    async def health(self) -> dict[str, Any]:
        """Liveness plus cache and pool statistics."""

    @abstractmethod
    async def flush_cache(self) -> int:
        """Drop every unlocked cached page; returns how many."""

    @abstractmethod
    async def abort(self, rid: str) -> bool:
        """Abort the request with this id (its stream ends with finish_reason "abort");
        False when no such request runs."""

    async def server_info(self) -> dict[str, Any]:
        return {"model_path": self.model_name}

    async def open_session(self, ttl: float | None, capacity: int | None) -> str:
        raise ValueError(NO_SESSIONS)

    async def close_session(self, sid: str) -> bool:
        raise ValueError(NO_SESSIONS)

    async def session_context(
        self, sid: str, rid: str | None, offset: int | None, new: int
    ) -> list[int]:
        """The tokens a request of the session continues (ValueError: no such session,
        request or offset, or past its capacity with `new` more tokens)."""
        raise ValueError(NO_SESSIONS)


NO_SESSIONS = "sessions are served by `strata serve` (one engine); the split cluster has none yet"


def radix_cache_stats(
    tree_stats: Any, tiers: dict[str, Any] | None = None, l3_store: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The /health view of a prefix cache: the tree's figures, the fraction of prompt tokens
    served from each tier (null for a tier that is off), and pages, bytes and traffic per
    tier. l3_store: the L3 store's own figures where known (pages, bytes)."""
    if tree_stats is None:
        return {"enabled": False}
    stats = asdict(tree_stats)
    prompt = stats["prompt_tokens"]

    def rate(tokens: int) -> float:
        return tokens / prompt if prompt else 0.0

    l1_tokens = stats["cached_tokens"] - stats["l2_tokens"] - stats["l3_tokens"]
    has_l3 = tiers is not None and tiers["l3"] is not None
    stats.update(
        enabled=True,
        l1_hit_rate=rate(l1_tokens),
        l2_hit_rate=rate(stats["l2_tokens"]) if tiers is not None else None,
        l3_hit_rate=rate(stats["l3_tokens"]) if has_l3 else None,
    )
    if tiers is not None:
        l3 = dict(tiers["l3"] or {}) if has_l3 else None
        if l3 is not None and l3_store is not None:
            l3.update(l3_store)
        stats["tiers"] = {
            "l2": tiers["l2"],
            "l3": l3,
            "bytes_moved": tiers["bytes_moved"],
            "write_policy": tiers["write_policy"],
        }
        if "fetch_on_select" in tiers:
            stats["tiers"]["fetch_on_select"] = tiers["fetch_on_select"]
    return stats


def load_json(
    running: int,
    waiting: int,
    pages_total: int,
    pages_free: int,
    cache: Any,
    tiers: dict[str, Any] | None,
    l3_store: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The load part of /health, one shape for the server, each worker and the cluster."""
    return {
        "running_requests": running,
        "waiting_requests": waiting,
        "pages_total": pages_total,
        "pages_free": pages_free,
        "radix_cache_stats": radix_cache_stats(cache, tiers, l3_store),
    }


class LocalBackend(Backend):
    """The colocated server's backend: the engine process behind an EngineClient."""

    def __init__(self, engine: EngineClient, model_name: str, sched: SchedulerConfig) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.sched = sched

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Checked:
        return self.engine.validate(prompt_ids, params)

    def generate(
        self, request: Checked, rid: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        return self.engine.stream(request, rid)

    async def health(self) -> dict[str, Any]:
        if not self.engine.alive:
            raise EngineGone("the engine process is gone")
        stats = await self.engine.ask(Stats())
        return {
            "status": "ok",
            "model": self.model_name,
            **load_json(
                stats.running,
                stats.waiting,
                stats.pages_total,
                stats.pages_free,
                stats.cache,
                stats.tiers,
            ),
            "jump_forward_tokens": stats.jump_forward_tokens,
            "speculative": {
                "draft_tokens": stats.draft_tokens,
                "accepted_tokens": stats.accepted_tokens,
            },
            "engine": {"pid": self.engine.process.pid, "loop_thread": stats.loop_thread},
            "memory": stats.memory,
            "sessions": stats.sessions,
        }

    async def flush_cache(self) -> int:
        return int(await self.engine.ask(FlushCache()))

    async def open_session(self, ttl: float | None, capacity: int | None) -> str:
        return str(await self.engine.ask(OpenSession(ttl, capacity)))

    async def close_session(self, sid: str) -> bool:
        return bool(await self.engine.ask(CloseSession(sid)))

    async def session_context(
        self, sid: str, rid: str | None, offset: int | None, new: int
    ) -> list[int]:
        return list(await self.engine.ask(SessionContext(sid, rid, offset, new)))

    async def abort(self, rid: str) -> bool:
        return bool(await self.engine.ask(AbortNow(rid)))

    async def server_info(self) -> dict[str, Any]:
        limits, sched = self.engine.limits, self.sched
        return {
            "model_path": self.model_name,
            "context_length": limits.max_context,
            "page_size": limits.page_size,
            "max_total_num_tokens": limits.num_pages * limits.page_size,
            "max_running_requests": sched.max_running_requests,
            "chunked_prefill_size": sched.max_batch_tokens,
            "radix_cache": sched.enable_radix_cache,
            "engine_pid": self.engine.process.pid,
            "memory": (await self.engine.ask(Stats())).memory,
        }
