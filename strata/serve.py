"""`strata serve`: one process with the engine and the REST front (colocated mode)."""

from __future__ import annotations

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
    import uvicorn

    from gateway.app import create_app
    from gateway.backend import LocalBackend

    engine = build_engine(model, cache, sched)
    name = server.served_model_name or (model.model_path or "SmolLM2-135M-Instruct")
    app = create_app(LocalBackend(engine, name))
    engine.start()
    log.info("serving %s on http://%s:%d", name, server.host, server.port)
    try:
        uvicorn.run(app, host=server.host, port=server.port, log_level=server.log_level.lower())
    finally:
        engine.shutdown()
