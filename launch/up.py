"""`strata up`: the split cluster as local processes on loopback (cache, prefill and decode
workers, gateway), started in dependency order, each waited on until healthy, then
supervised (a service that exits is restarted on its address); Ctrl-C or SIGTERM stops all
at once (each finishes its calls in flight), and the children die with `strata up`."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.grpcio import open_channel
from strata.config import system_env


def free_port(host: str, taken: set[int]) -> int:
    """A port free now and not in taken (which it joins): the ports handed out here are
    bound only later, by the children, so the OS could otherwise hand one out twice or
    give away the gateway's. Drawn below the range the OS takes outgoing connections' local
    ports from (Linux: ip_local_port_range), which a connection opened in between could
    otherwise hold (a test's gRPC port was lost so, 2026-12-04)."""
    low = _ephemeral_low()
    while True:
        port = random.randrange(PORT_FLOOR, low) if low > PORT_FLOOR + 1000 else 0
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:  # in use: draw again
                continue
            port = int(s.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port


PORT_FLOOR = 10000  # NOTE: below it, well-known services' ports


def _ephemeral_low() -> int:
    """The first port of the OS's range for outgoing connections (32768 where unknown)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class Stopped(Exception):
    """SIGINT or SIGTERM came while the cluster was starting."""


def wait_ready(
    name: str,
    ready: Callable[[], bool],
    proc: subprocess.Popen,
    timeout: float,
    stopped: Callable[[], bool],
) -> None:
    """Poll ready() until it says True; Stopped on SIGINT / SIGTERM, RuntimeError when the
    child exits, TimeoutError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if stopped():
            raise Stopped
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not become healthy in {timeout:.0f}s")
        time.sleep(0.3)


def wait_grpc(
    target: str, proc: subprocess.Popen, timeout: float, stopped: Callable[[], bool]
) -> None:
    """Until the service's gRPC health check says SERVING."""
    with open_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            except grpc.RpcError:
                return False
            return bool(status == health_pb2.HealthCheckResponse.SERVING)

        wait_ready(target, serving, proc, timeout, stopped)


def wait_http(
    url: str, proc: subprocess.Popen, timeout: float, stopped: Callable[[], bool]
) -> None:
    """Until the gateway answers /health. Its status may be "degraded" already (a worker
    died since it was SERVING): supervision starts now and restarts it."""

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=5).json().get("status") in ("ok", "degraded")
        except (httpx.HTTPError, ValueError):
            return False

    wait_ready(url, answers, proc, timeout, stopped)


RESTART_WINDOW = 60.0  # seconds: a child restarted this often within it is in a crash loop
MAX_RESTARTS = 5
STOP_GRACE = 10.0  # children get this long to finish their calls, then 5 s more, then a kill


def log(message: str) -> None:
    print(f"strata up: {message}", file=sys.stderr, flush=True)


PARENT_ENV = "STRATA_PARENT_PID"  # set for each child: the `strata up` it must die with


def die_with_parent() -> None:
    """First thing in a child of `strata up` (launch.cli.main): SIGTERM it when that parent
    dies, even by SIGKILL (PR_SET_PDEATHSIG); at once if it died already."""
    parent = os.environ.pop(PARENT_ENV, None)
    if not parent or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class Child:
    """One supervised service: how to start it, its process, and its recent restarts."""

    name: str
    args: list[str]
    env: dict[str, str] | None
    proc: subprocess.Popen | None = None
    restarts: deque[float] = field(default_factory=deque)
    retry_at: float = 0.0  # restart after this time (backoff)
    given_up: bool = False

    def start(self) -> subprocess.Popen:
        # NOTE: no preexec_fn (the child sets its own death signal, die_with_parent): code
        # run between fork and exec can deadlock in a process with threads, and gRPC's are.
        env = {**(self.env if self.env is not None else os.environ), PARENT_ENV: str(os.getpid())}
        self.proc = subprocess.Popen(self.args, env=env)
        return self.proc

    def supervise(self, now: float) -> None:
        """Restart it with backoff if it exited; after MAX_RESTARTS in RESTART_WINDOW, give
        up on it (the rest of the cluster keeps serving)."""
        if self.given_up or self.proc is None or self.proc.poll() is None:
            return
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW:
            self.restarts.popleft()
        if not self.retry_at:
            if len(self.restarts) >= MAX_RESTARTS:
                self.given_up = True
                n, window = len(self.restarts), RESTART_WINDOW
                log(f"{self.name} keeps exiting ({n} restarts in {window:.0f}s); giving up on it")
                return
            delay = min(2.0 ** len(self.restarts), 30.0)
            log(f"{self.name} exited with {self.proc.returncode}; restarting in {delay:.0f}s")
            self.retry_at = now + delay
        if now >= self.retry_at:
            self.restarts.append(now)
            self.retry_at = 0.0
            self.start()


def stop_all(children: Sequence[Child], grace: float = STOP_GRACE) -> None:
    """SIGTERM every child at once; kill what is left after grace + 5 s."""
    live = [c.proc for c in children if c.proc is not None and c.proc.poll() is None]
    for p in live:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace + 5
    for p in live:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@dataclass
class Launch:
    """The children `up` starts, on free ports of host, and whether a signal asked it to stop."""

    host: str
    log_level: str
    timeout: float
    taken: set[int]
    children: list[Child] = field(default_factory=list)
    stopping: bool = False

    def stop(self, *_: object) -> None:
        self.stopping = True

    def stopped(self) -> bool:
        return self.stopping

    def address(self) -> str:
        return f"{self.host}:{free_port(self.host, self.taken)}"

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        cli = [sys.executable, "-m", "launch.cli"]
        self.children.append(Child(name, [*cli, *args, "--log-level", self.log_level], env))
        return self.children[-1].start()

    def start_workers(
        self, counts: dict[str, int], cache: str, args: Sequence[str]
    ) -> dict[str, list[str]]:
        """Start the prefill and decode workers side by side (they load the model at once);
        returns their addresses once each serves."""
        # Prefill workers work in bursts: on a shared CPU their OpenMP threads must sleep, not
        # spin, between bursts, or they take cores from the decode workers (unless set already).
        bursty = {**os.environ, "OMP_WAIT_POLICY": system_env("OMP_WAIT_POLICY") or "PASSIVE"}
        workers: dict[str, list[str]] = {role: [] for role in counts}
        started = []
        for role, n in counts.items():
            for _ in range(n):
                target = self.address()
                host, port = target.rsplit(":", 1)
                flags = ["--host", host, "--port", port, "--cache-service", cache, *args]
                env = bursty if role == "prefill" else None
                started.append(
                    (target, self.start(f"{role} worker {target}", role, *flags, env=env))
                )
                workers[role].append(target)
        for target, proc in started:
            wait_grpc(target, proc, self.timeout, self.stopped)
        return workers

    def supervise(self) -> int:
        """Restart what exits until a signal stops us (0) or the gateway is given up on (1)."""
        while not self.stopping:
            now = time.monotonic()
            for child in self.children:
                child.supervise(now)
            if all(c.given_up for c in self.children if c.name == "gateway"):
                log("the gateway is gone; stopping")
                return 1
            time.sleep(0.5)
        return 0


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
    """Start the cluster and supervise it until SIGINT or SIGTERM: a service that exits is
    restarted on its own address (with backoff; a crash loop is given up on), so one
    worker's death is not an outage; every child dies with this process."""
    run = Launch(host, log_level, timeout, {port, grpc_port or port + 1})
    # explicit handlers: a shell that ignores SIGINT (no KeyboardInterrupt) still stops us
    signal.signal(signal.SIGTERM, run.stop)
    signal.signal(signal.SIGINT, run.stop)
    try:
        cache = run.address()
        flags = ["--host", host, "--port", cache.rsplit(":", 1)[1], *cache_args]
        wait_grpc(cache, run.start("cache service", "cache", *flags), timeout, run.stopped)
        counts = {"prefill": num_prefill, "decode": num_decode}
        workers = run.start_workers(counts, cache, [*model_args, *worker_args])
        prefill, decode = ",".join(workers["prefill"]), ",".join(workers["decode"])
        gateway = run.start(
            "gateway",
            "gateway",
            *("--host", host, "--port", str(port), "--grpc-port", str(grpc_port)),
            *("--cache-service", cache, "--decode", decode, "--prefill", prefill),
            *model_args,
            *gateway_args,
        )
        url = f"http://{host}:{port}"
        wait_http(url, gateway, timeout, run.stopped)
        print(
            f"strata up: gateway {url} (gRPC {host}:{grpc_port or port + 1}), cache {cache}, "
            f"prefill {', '.join(workers['prefill']) or '-'}, "
            f"decode {', '.join(workers['decode'])}",
            flush=True,
        )
        return run.supervise()
    except (KeyboardInterrupt, Stopped):
        return 0
    finally:
        stop_all(run.children)
