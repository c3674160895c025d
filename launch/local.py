"""Start real strata processes (`strata serve`, `strata up`, a single service) on loopback and
wait until they are healthy: for tests, benchmarks and the reliability suite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import TypeVar

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from launch import up

_HANDED: set[int] = set()  # ports this process handed out, never handed again
_HANDING = threading.Lock()  # processes started together draw ports from threads
T = TypeVar("T")


def free_port() -> int:
    """A loopback port free now (launch.up.free_port), not one handed out before."""
    with _HANDING:
        return up.free_port("127.0.0.1", _HANDED)


def started_together(stack: ExitStack, starts: Sequence[AbstractContextManager[T]]) -> list[T]:
    """Enter starts (running_server, running_cluster, ...) at once, on stack: their
    processes start side by side and each is waited on, so a test that needs several pays
    for the slowest, not the sum. Each is left by stack."""
    with ThreadPoolExecutor(max(1, len(starts))) as pool:
        return list(pool.map(stack.enter_context, starts))


def _wait_healthy(url: str, proc: subprocess.Popen, log, timeout: float, poll: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).json().get("status") == "ok":
                return
        except (httpx.HTTPError, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            out = log.read().decode(errors="replace")
            raise RuntimeError(f"{proc.args!r} did not become healthy:\n{out}")
        time.sleep(poll)


@contextmanager
def grpc_service(
    *args: str, timeout: float = 120.0, port: int | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`strata <args> --port P` (a cache, prefill or decode service) until its gRPC health
    check says SERVING; yields (target, process); stops it with SIGTERM."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "launch.cli", *args, "--port", str(port)]
    target = f"127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        try:
            with grpc.insecure_channel(target) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                        break
                    except grpc.RpcError:
                        if proc.poll() is not None or time.monotonic() > deadline:
                            log.seek(0)
                            out = log.read().decode(errors="replace")
                            raise RuntimeError(f"{cmd!r} did not become healthy:\n{out}") from None
                        time.sleep(0.2)
            yield target, proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


@contextmanager
def running_cluster(*extra: str, timeout: float = 300.0) -> Iterator[tuple[str, str]]:
    """`strata up` (cache, decode workers, gateway); yields (REST url, gRPC target). Stops it
    with Ctrl-C (SIGINT), as a user would."""
    port, grpc_port = free_port(), free_port()
    # a fresh L3 store: warm pages from another run would change routing and hit rates
    store = tempfile.TemporaryDirectory()
    cmd = [
        sys.executable,
        "-m",
        "launch.cli",
        "up",
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
        "--hicache-storage-dir",
        store.name,
        *extra,
    ]
    with store, tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc, log, timeout)
            yield url, f"127.0.0.1:{grpc_port}"
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise


@contextmanager
def running_server(*extra: str, timeout: float = 180.0) -> Iterator[str]:
    """`strata serve` (float32) until /health answers; yields its URL."""
    with running_http("serve", "--dtype", "float32", *extra, timeout=timeout) as url:
        yield url


@contextmanager
def running_http(command: str, *extra: str, timeout: float = 180.0) -> Iterator[str]:
    """`strata <command>` with a REST front (serve, gateway) until /health answers."""
    port = free_port()
    auth = {}
    if "--api-key" in extra:  # a protected /health needs it
        auth = {"Authorization": f"Bearer {extra[list(extra).index('--api-key') + 1]}"}
    cmd = [
        sys.executable,
        "-m",
        "launch.cli",
        command,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--grpc-port",
        "-1",
        "--log-level",
        "warning",
        *extra,
    ]
    with running_process(cmd, f"http://127.0.0.1:{port}", "/health", auth, timeout) as url:
        yield url


@contextmanager
def running_process(
    cmd: list[str], url: str, ready_path: str, headers: dict[str, str], timeout: float
) -> Iterator[str]:
    """Start cmd, wait until GET url + ready_path answers 200, yield url; terminate it after."""
    # NOTE: the log goes to a file, never an unread pipe: a full pipe would block the server.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    out = log.read().decode(errors="replace")
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{out}")
                try:
                    r = httpx.get(f"{url}{ready_path}", headers=headers, timeout=2)
                    if r.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("server did not become healthy")
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_redis(port: int, maxmemory: str = "256mb", timeout: float = 20.0) -> subprocess.Popen:
    """A redis-server (Debian's package) on 127.0.0.1:port with no persistence and a
    volatile-lru budget (the pages no retention priority holds go, least recently used
    first), once it answers PING (for tests and benchmarks)."""
    import shutil

    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (`make test` installs Debian's package)")
    flags = {
        "bind": "127.0.0.1",
        "port": str(port),
        "save": "",
        "appendonly": "no",
        "maxmemory": maxmemory,
        "maxmemory-policy": "volatile-lru",
    }
    args = [binary, *(x for k, v in flags.items() for x in (f"--{k}", v))]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return proc
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
    finally:
        client.close()
