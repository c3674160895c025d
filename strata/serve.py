"""`strata serve`: one process with the engine and the REST front (colocated mode)."""

from __future__ import annotations

import asyncio
import logging

from strata.config import CacheConfig, ModelConfig, SchedulerConfig, ServerConfig
from strata.engine.engine import Engine
from strata.engine.runner import ModelRunner

log = logging.getLogger(__name__)


def build_engine(model: ModelConfig, cache: CacheConfig, sched: SchedulerConfig) -> Engine:
    runner = ModelRunner.from_config(model, cache)
    if runner.tokenizer is None:
        raise ValueError(f"no tokenizer in {runner.checkpoint}: the server needs one")
    return Engine(
        runner,
        enable_cache=sched.enable_radix_cache,
        max_batch_tokens=sched.max_batch_tokens,
        max_running=sched.max_running_requests,
    )


def serve(
    model: ModelConfig, cache: CacheConfig, sched: SchedulerConfig, server: ServerConfig
) -> None:
    engine = build_engine(model, cache, sched)
    name = server.served_model_name or (model.model_path or "SmolLM2-135M-Instruct")
    engine.start()
    try:
        asyncio.run(_serve_fronts(engine, name, server))
    finally:
        engine.shutdown()


async def _serve_fronts(engine: Engine, name: str, server: ServerConfig) -> None:
    """REST (uvicorn) and gRPC (grpc.aio) on one event loop over one backend."""
    import uvicorn

    from gateway.app import create_app
    from gateway.backend import LocalBackend
    from gateway.grpc_server import start_grpc

    backend = LocalBackend(engine, name)
    grpc_server = None
    if server.grpc_port >= 0:
        grpc_port = server.grpc_port or server.port + 1
        grpc_server, bound = await start_grpc(backend, server.host, grpc_port)
        log.info("gRPC strata.v1.Gateway on %s:%d", server.host, bound)
    config = uvicorn.Config(
        create_app(backend), host=server.host, port=server.port,
        log_level=server.log_level.lower(),
    )  # fmt: skip
    log.info("serving %s on http://%s:%d", name, server.host, server.port)
    try:
        await uvicorn.Server(config).serve()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=5)
