"""Faults under load on `strata up --prefill 0 --decode 2`: 16 streaming clients run for 45 s
while a decode worker is SIGKILLed (at 8 s) and then the cache service (at 25 s). Every stream
must complete or end with an error event (a stream cut on the dead worker) or a 4xx: none
lost, none hanging. The gateway must stop routing to the dead worker within 2 s, and `strata
up` must restart both services."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

import httpx

from launch.local import _wait_healthy, free_port
from reliability.conftest import figure
from reliability.test_load import load
from tests.e2e.test_supervision import children, cmdline

SECONDS = 45.0


def kids(up: int, role: str) -> list[int]:
    return sorted(p for p in children(up) if f" {role} " in cmdline(p))


def test_worker_and_cache_service_deaths_under_load_lose_no_stream():
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "launch.cli",
        "up",
        "--port",
        str(port),
        "--grpc-port",
        "-1",
        "--prefill",
        "0",
        "--decode",
        "2",
        "--disable-hierarchical-cache",
    ]
    with tempfile.TemporaryFile() as log:
        up = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, up, log, 300)
            outcomes: Counter = Counter()
            runner = threading.Thread(
                target=lambda: outcomes.update(asyncio.run(load(url, SECONDS, clients=16)))
            )
            runner.start()
            time.sleep(8)
            victim = kids(up.pid, "decode")[0]
            workers = httpx.get(f"{url}/health", timeout=30).json()["workers"]
            port_of = {
                int(cmdline(p).split("--port ")[1].split()[0]): p for p in kids(up.pid, "decode")
            }
            target = next(
                w["worker"]
                for w in workers
                if port_of.get(int(w["worker"].rsplit(":", 1)[1])) == victim
            )
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            while True:  # until the gateway stops routing to it
                health = httpx.get(f"{url}/health", timeout=30).json()
                if any(w["worker"] == target and w["status"] != "ok" for w in health["workers"]):
                    break
                time.sleep(0.05)
            reroute = time.monotonic() - killed
            time.sleep(max(0.0, 25 - (time.monotonic() - killed) - 8))
            (cache,) = kids(up.pid, "cache")
            os.kill(cache, signal.SIGKILL)
            runner.join(SECONDS + 180)
            assert not runner.is_alive(), "the clients hung"
            deadline = time.monotonic() + 120
            while True:  # both services restarted, every worker ok
                health = httpx.get(f"{url}/health", timeout=30).json()
                restarted = kids(up.pid, "cache") not in ([], [cache]) and victim not in kids(
                    up.pid, "decode"
                )
                if restarted and all(w["status"] == "ok" for w in health["workers"]):
                    break
                assert time.monotonic() < deadline, health
                time.sleep(1)
            assert up.poll() is None
        finally:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
    figure(
        "faults injected",
        "SIGKILL of a decode worker under load, SIGKILL of the cache "
        "service under load (plus tests/e2e/test_supervision.py: a worker, then strata up)",
    )
    figure("faults outcomes", dict(sorted(outcomes.items())))
    figure("faults reroute seconds", f"{reroute:.2f}")
    assert set(outcomes) <= {"completed", "cut", "error_event", "refused_4xx"}, outcomes
    assert outcomes["completed"] > 16
    assert reroute <= 2.0
