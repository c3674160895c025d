"""Administration: health, metrics, server info and the cache flush."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.rest import backend_of, front_of
from strata.sampling.params import SamplingParams

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return await backend_of(request).health()


@router.get("/health_generate")
async def health_generate(request: Request) -> dict[str, Any]:
    front = front_of(request)
    ping = await front.validate(front.encode("ping"), SamplingParams(max_new_tokens=1))
    run = await front.collect(ping, "health")
    return {"status": "error" if run.failed else "ok"}


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    registry = request.app.state.metrics
    registry.observe_health(await backend_of(request).health())
    return PlainTextResponse(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/get_server_info")
async def server_info(request: Request) -> dict[str, Any]:
    return {"version": request.app.version, **await backend_of(request).server_info()}


@router.post("/flush_cache")
async def flush_cache(request: Request) -> dict[str, Any]:
    return {"status": "ok", "flushed_pages": await backend_of(request).flush_cache()}
