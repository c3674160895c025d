"""Backend: what the REST layer talks to. LocalBackend wraps an in-process Engine."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Sequence
from dataclasses import asdict
from typing import Any

from strata.engine.engine import Engine
from strata.engine.request import RequestOutput
from strata.sampling.params import SamplingParams


class Backend(ABC):
    """Runs generations for the gateway (an in-process engine, or remote workers)."""

    tokenizer: Any
    model_name: str

    @abstractmethod
    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ValueError for a request that can never run."""

    @abstractmethod
    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, rid: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream events until one has a finish_reason. Closing the iterator early aborts
        the request and frees its pages. Raises ValueError for a request that cannot run."""

    @abstractmethod
    async def health(self) -> dict[str, Any]:
        """Liveness plus cache and pool statistics."""

    @abstractmethod
    async def flush_cache(self) -> int:
        """Drop every unlocked cached page; returns how many."""


def radix_cache_stats(tree_stats: Any) -> dict[str, Any]:
    if tree_stats is None:
        return {"enabled": False}
    stats = asdict(tree_stats)
    # Only the device tier exists so far: every hit is an L1 hit.
    stats.update(enabled=True, l1_hit_rate=stats["hit_rate"], l2_hit_rate=0.0)
    return stats


class LocalBackend(Backend):
    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        self.engine.validate(prompt_ids, params)

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, rid: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        return self.engine.stream(prompt_ids, params, rid)

    async def health(self) -> dict[str, Any]:
        stats = await asyncio.wrap_future(self.engine.call(self.engine.stats))
        return {
            "status": "ok",
            "model": self.model_name,
            "running_requests": stats.running,
            "waiting_requests": stats.waiting,
            "pages_total": stats.pages_total,
            "pages_free": stats.pages_free,
            "jump_forward_tokens": stats.jump_forward_tokens,
            "radix_cache_stats": radix_cache_stats(stats.cache),
        }

    async def flush_cache(self) -> int:
        return int(await asyncio.wrap_future(self.engine.call(self.engine.flush_cache)))
