"""What every strata gRPC server has: standard health checking, reflection, an API key check,
and (between services, optional) mutual TLS.

Mutual TLS is set once per process (`use_tls`, from `--tls-cert/--tls-key/--tls-ca`): every
internal server then requires a client certificate signed by the CA, and every channel this
process opens to another service presents its own. The gateway's public gRPC port is not an
internal server and keeps to plain gRPC + the API key.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

# Every strata server and channel sets both limits (grpc's default receive limit is 4 MiB):
# a bigger message is refused with RESOURCE_EXHAUSTED before it is parsed.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Channels: a restarted peer is dialled again within 2 s (grpc's default backoff grows to
# 120 s, which would keep a worker that came back out of routing for minutes).
CHANNEL_OPTIONS = [
    *MESSAGE_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True)
class TLSFiles:
    """PEM files: this process's certificate and key, and the CA that signs every peer's."""

    cert: Path
    key: Path
    ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        try:
            return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()
        except OSError as exc:
            raise ValueError(f"--tls-cert/--tls-key/--tls-ca: {exc}") from None


# this process's mutual TLS between services, the PEM bytes (cert, key, ca); None: plain
_tls: tuple[bytes, bytes, bytes] | None = None


def use_tls(tls: TLSFiles | None) -> None:
    """Set this process's mutual TLS between services (before any server or channel); the
    files are read once, here, so unreadable ones are refused now."""
    global _tls
    _tls = tls.read() if tls is not None else None


def _channel_credentials() -> grpc.ChannelCredentials | None:
    if _tls is None:
        return None
    cert, key, ca = _tls
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def open_channel(target: str, options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS) -> grpc.Channel:
    """A channel to another strata service (mutual TLS when the process uses it)."""
    creds = _channel_credentials()
    if creds is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, creds, options=list(options))


def open_aio_channel(target: str) -> grpc.aio.Channel:
    """open_channel for asyncio callers."""
    creds = _channel_credentials()
    if creds is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(target, creds, options=CHANNEL_OPTIONS)


async def start_server(
    host: str,
    port: int,
    add: Sequence[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    internal: bool = True,
) -> tuple[grpc.aio.Server, int]:
    """Start an aio server with each (add_XServicer_to_server, servicer, full service name),
    plus health (every service SERVING) and reflection; returns (server, bound port). An
    internal server requires mutual TLS when the process uses it."""
    server = grpc.aio.server(interceptors=list(interceptors), options=MESSAGE_OPTIONS)
    for add_fn, servicer, _ in add:
        add_fn(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [name for _, _, name in add]
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection([*names, health_name, reflection.SERVICE_NAME], server)
    if internal and _tls is not None:
        cert, key, ca = _tls
        creds = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )
        bound = server.add_secure_port(f"{host}:{port}", creds)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    for name in ("", *names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound


async def run_until_signal(
    server: grpc.aio.Server, grace: float, stopping: threading.Event | None = None
) -> None:
    """Serve until SIGTERM or SIGINT (or until `stopping` is set, where the main thread owns
    the signals), then shut down gracefully: refuse new calls, give the calls in flight
    `grace` seconds to finish, then cancel them (which aborts them cleanly)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if stopping is None else ()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    waits = [
        asyncio.ensure_future(server.wait_for_termination()),
        asyncio.ensure_future(stop.wait()),
    ]
    if stopping is not None:
        waits.append(asyncio.ensure_future(_wait_for(stopping)))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        log.info("shutting down: %.0fs for the calls in flight", grace)
        await server.stop(grace)
        for task in waits:
            task.cancel()
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _wait_for(event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.2)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Calls must carry `authorization: Bearer KEY` metadata, else UNAUTHENTICATED; health
    checks and reflection stay open unless protect_health."""

    OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, api_key: str, protect_health: bool = False) -> None:
        self.expected = f"Bearer {api_key}".encode()
        self.protect_health = protect_health

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or (not self.protect_health and details.method.startswith(self.OPEN)):
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(got).encode(), self.expected):
            return handler
        return _denied(handler)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that refuses the call."""
    message = "missing or wrong API key (metadata authorization: Bearer KEY)"

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover (abort raises)

    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **codec)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(stream, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **codec)
    return grpc.unary_unary_rpc_method_handler(unary, **codec)
