"""`strata up`: the split cluster as local processes on loopback (cache, decode workers,
gateway), started in dependency order, each waited on until healthy; Ctrl-C stops all."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_grpc(target: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} did not become healthy in {timeout:.0f}s")
            time.sleep(0.3)


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).json().get("status") == "ok":
                return
        except (httpx.HTTPError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not become healthy in {timeout:.0f}s")
        time.sleep(0.3)


def up(
    host: str,
    port: int,
    grpc_port: int,
    num_decode: int,
    model_args: Sequence[str],
    worker_args: Sequence[str],
    log_level: str,
    timeout: float = 300.0,
) -> int:
    cli = [sys.executable, "-m", "strata.cli"]
    procs: list[subprocess.Popen] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    try:
        cache = f"{host}:{free_port(host)}"
        procs.append(
            subprocess.Popen(
                [
                    *cli,
                    "cache",
                    "--host",
                    host,
                    "--port",
                    cache.rsplit(":", 1)[1],
                    "--log-level",
                    log_level,
                ]
            )
        )
        wait_grpc(cache, procs[-1], timeout)
        decode = []
        for _ in range(num_decode):
            p = free_port(host)
            decode.append(f"{host}:{p}")
            procs.append(
                subprocess.Popen(
                    [
                        *cli,
                        "decode",
                        "--host",
                        host,
                        "--port",
                        str(p),
                        "--cache",
                        cache,
                        *model_args,
                        *worker_args,
                        "--log-level",
                        log_level,
                    ]
                )
            )
        for target, proc in zip(decode, procs[1:]):
            wait_grpc(target, proc, timeout)
        procs.append(
            subprocess.Popen(
                [
                    *cli,
                    "gateway",
                    "--host",
                    host,
                    "--port",
                    str(port),
                    "--grpc-port",
                    str(grpc_port),
                    "--cache",
                    cache,
                    "--decode",
                    ",".join(decode),
                    *model_args,
                    "--log-level",
                    log_level,
                ]
            )
        )
        url = f"http://{host}:{port}"
        wait_http(url, procs[-1], timeout)
        print(
            f"strata up: gateway {url} (gRPC {host}:{grpc_port or port + 1}), "
            f"cache {cache}, decode {', '.join(decode)}",
            flush=True,
        )
        while not stopping:
            if any(p.poll() is not None for p in procs):
                print("strata up: a service exited; stopping the cluster", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for p in reversed(procs):  # gateway first, cache last
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in reversed(procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
