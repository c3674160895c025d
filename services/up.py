"""`strata up`: the split cluster as local processes on loopback (cache, prefill and decode
workers, gateway), started in dependency order, each waited on until healthy; Ctrl-C stops
all, gateway first (each finishes its calls in flight)."""

from __future__ import annotations

import os
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
    num_prefill: int,
    num_decode: int,
    model_args: Sequence[str],
    worker_args: Sequence[str],
    gateway_args: Sequence[str],
    cache_args: Sequence[str],
    log_level: str,
    timeout: float = 300.0,
) -> int:
    cli = [sys.executable, "-m", "strata.cli"]
    procs: list[subprocess.Popen] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        procs.append(subprocess.Popen([*cli, *args, "--log-level", log_level], env=env))
        return procs[-1]

    # Prefill workers work in bursts: on a shared CPU their OpenMP threads must sleep, not
    # spin, between bursts, or they take cores from the decode workers (unless set already).
    bursty = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}

    signal.signal(signal.SIGTERM, stop)
    try:
        cache = f"{host}:{free_port(host)}"
        port_arg = cache.rsplit(":", 1)[1]
        wait_grpc(cache, start("cache", "--host", host, "--port", port_arg, *cache_args), timeout)
        workers: dict[str, list[str]] = {"prefill": [], "decode": []}
        started = []
        for role, n in (("prefill", num_prefill), ("decode", num_decode)):
            for _ in range(n):
                p = free_port(host)
                workers[role].append(f"{host}:{p}")
                proc = start(role, "--host", host, "--port", str(p), "--cache", cache,
                             *model_args, *worker_args,
                             env=bursty if role == "prefill" else None)  # fmt: skip
                started.append((workers[role][-1], proc))
        for target, proc in started:  # they load the model side by side
            wait_grpc(target, proc, timeout)
        gateway = start(
            "gateway", "--host", host, "--port", str(port), "--grpc-port", str(grpc_port),
            "--cache", cache, "--decode", ",".join(workers["decode"]),
            "--prefill", ",".join(workers["prefill"]), *model_args, *gateway_args,
        )  # fmt: skip
        url = f"http://{host}:{port}"
        wait_http(url, gateway, timeout)
        print(
            f"strata up: gateway {url} (gRPC {host}:{grpc_port or port + 1}), cache {cache}, "
            f"prefill {', '.join(workers['prefill']) or '-'}, "
            f"decode {', '.join(workers['decode'])}",
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
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
