"""The processes the `strata` command runs: `strata serve` (the REST and gRPC fronts here, the
engine in a process of its own), and the split cluster's gateway and prefill / decode workers."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from strata.config import HiCacheConfig, KVPoolConfig, ModelConfig, SchedulerConfig, ServerConfig
from strata.engine.process import EngineClient, EngineConfig, build_engine
from strata.model.loader import load_tokenizer, read_config, resolve_checkpoint

if TYPE_CHECKING:
    import uvicorn

    from gateway.backend import Backend

log = logging.getLogger(__name__)


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """asyncio.run on uvloop (uvicorn takes httptools where it is installed): the front's
    work per streamed token (read the engine's pipe, wake the request's task, write a
    chunk) costs ~10% less CPU than on asyncio's own loop, CPU that on a small machine
    comes out of the engine's step."""
    import uvloop

    uvloop.run(main)


def serve(
    model: ModelConfig,
    pool: KVPoolConfig,
    sched: SchedulerConfig,
    server: ServerConfig,
    tiers: HiCacheConfig,
    random_seed: int | None = None,
) -> None:
    """The engine in its own process (its step loop on that process's main thread), the
    REST and gRPC fronts in this one."""
    from gateway.backend import LocalBackend

    cfg = EngineConfig(model, pool, sched, tiers, random_seed, server.log_level)
    engine = EngineClient(cfg)
    name = server.served_model_name or (model.model_path or "SmolLM2-135M-Instruct")
    try:
        run_loop(_serve_fronts(LocalBackend(engine, name, sched), name, server, engine))
    finally:
        died = not engine.alive
        engine.shutdown()
    if died:  # a non-zero exit: a supervisor (docker, systemd) restarts the server
        log.error("the engine process died; the server stopped")
        sys.exit(3)


def serve_gateway(
    model: ModelConfig,
    server: ServerConfig,
    cache_service: str,
    decode_targets: list[str],
    prefill_targets: list[str],
    local_prefill_tokens: int,
    max_per_worker: int | None = None,
    migration_limit: int = 3,
    discovery: str = "static",
) -> None:
    """The split cluster's gateway: tokenizer and chat template here, prefill on the
    prefill workers and generation on the decode workers (routed by the cache service's
    prefix index)."""
    from gateway.remote import RemoteBackend
    from strata.model.registry import model_spec

    folder = resolve_checkpoint(model.model_path)
    spec = model_spec(read_config(folder))
    name = server.served_model_name or (model.model_path or "SmolLM2-135M-Instruct")
    backend = RemoteBackend(
        load_tokenizer(folder),
        name,
        spec,
        cache_service,
        decode_targets,
        prefill_targets,
        local_prefill_tokens,
        max_per_worker=max_per_worker,
        migration_limit=migration_limit,
        discovery=discovery,
    )
    run_loop(_serve_fronts(backend, name, server))


def serve_worker(
    role: str,
    model: ModelConfig,
    pool: KVPoolConfig,
    sched: SchedulerConfig,
    tiers: HiCacheConfig,
    host: str,
    port: int,
    cache_service: str,
    worker_id: str | None,
    grace: float = 10.0,
) -> None:
    """A split-mode worker ("prefill" or "decode"): the engine with its own radix tree,
    whose KV events go to the cache service under worker_id (default host:port, the address
    the gateway routes to)."""
    from services.cache.publisher import KVEventPublisher
    from services.decode.server import serve as serve_decode
    from services.prefill.server import serve as serve_prefill

    worker_id = worker_id or f"{host}:{port}"
    # a prefill worker samples one token: the decode worker jumps forward
    engine = build_engine(model, pool, sched, tiers, True, jump_forward=role != "prefill")
    publisher = None
    if engine.prefix_cache is not None:
        publisher = KVEventPublisher(cache_service, worker_id, engine)
        engine.event_sink = publisher
        publisher.start()
    service = serve_prefill if role == "prefill" else serve_decode
    # NOTE: the step loop runs on this main thread (torch on a side thread cost 1.7x per
    # step on CPU); the gRPC service runs on its own event loop on a side thread.
    stopping = threading.Event()
    failure: list[BaseException] = []

    def run_service() -> None:
        try:
            asyncio.run(service(engine, worker_id, host, port, grace, stopping, cache_service))
        except BaseException as exc:  # e.g. the port is taken: the worker must exit
            failure.append(exc)
            engine.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    engine.expect_loop()
    grpc_thread = threading.Thread(target=run_service, name="strata-grpc")
    grpc_thread.start()
    try:
        engine.run()
    finally:
        stopping.set()
        grpc_thread.join()
        engine.close()
        if publisher is not None:
            publisher.stop()
    if failure:
        raise failure[0]


async def _serve_fronts(
    backend: Backend, name: str, server: ServerConfig, engine: EngineClient | None = None
) -> None:
    """REST (uvicorn) and gRPC (grpc.aio) on one event loop over one backend. engine: the
    engine process behind it; the fronts shut down when it dies (a supervisor restarts
    the server)."""
    import uvicorn

    from gateway.app import create_app
    from gateway.grpc_server import start_grpc
    from gateway.metrics import Metrics

    metrics = Metrics()  # one registry: /metrics counts REST and gRPC requests alike
    grpc_server = None
    if server.grpc_port >= 0:
        grpc_port = server.grpc_port or server.port + 1
        grpc_server, bound = await start_grpc(
            backend, server.host, grpc_port, server.api_key, server.protect_health, metrics
        )
        log.info("gRPC strata.v1.Gateway on %s:%d", server.host, bound)
    config = uvicorn.Config(
        create_app(
            backend, server.api_key, server.protect_health, metrics, server.tool_call_parser
        ),
        host=server.host,
        port=server.port,
        log_level=server.log_level.lower(),
        timeout_graceful_shutdown=10,
    )
    log.info("serving %s on http://%s:%d", name, server.host, server.port)
    front = uvicorn.Server(config)
    watch = None
    if engine is not None:
        watch = asyncio.get_running_loop().create_task(_watch_engine(engine, front))
    try:
        await front.serve()
    finally:
        if watch is not None:
            watch.cancel()
        if grpc_server is not None:
            await grpc_server.stop(grace=5)


async def _watch_engine(engine: EngineClient, front: uvicorn.Server) -> None:
    while engine.alive:
        await asyncio.sleep(0.5)
    log.error("the engine process is gone; shutting down the server")
    await asyncio.sleep(0.5)  # streams in flight get their error events out
    front.should_exit = True
