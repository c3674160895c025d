"""`strata up` supervises its cluster: with a decode worker SIGKILLed, every request still
gets its answer (the gateway retries one that produced nothing on the other worker, and
stops routing to the dead one), the worker is restarted on its address and serves again;
when `strata up` itself is SIGKILLed, its children die with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from launch.local import _wait_healthy, free_port

pytestmark = pytest.mark.slow


def children(pid: int) -> list[int]:
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == pid:
            out.append(int(status.parent.name))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return False


def ask(url: str) -> httpx.Response:
    return httpx.post(
        f"{url}/generate",
        timeout=120,
        json={"text": "Hello", "sampling_params": {"max_new_tokens": 2, "temperature": 0}},
    )


def test_killed_worker_restarts_and_children_die_with_up():
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
            assert ask(url).status_code == 200
            decode = sorted(p for p in children(up.pid) if " decode " in cmdline(p))
            assert len(decode) == 2
            os.kill(decode[0], signal.SIGKILL)
            for _ in range(6):  # at once: each answered, by the other worker if need be
                r = ask(url)
                assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 2
            deadline = time.monotonic() + 180
            while True:  # the killed worker is restarted and reported ok again
                now = sorted(p for p in children(up.pid) if " decode " in cmdline(p))
                health = httpx.get(f"{url}/health", timeout=30).json()
                if (
                    len(now) == 2
                    and now != decode
                    and all(w["status"] == "ok" for w in health["workers"])
                ):
                    break
                assert time.monotonic() < deadline, "the decode worker did not come back"
                time.sleep(1)
            assert ask(url).status_code == 200
            assert up.poll() is None  # one worker's death was not an outage
            kids = children(up.pid)
            assert len(kids) == 4  # cache, two decode workers, gateway
            up.kill()  # SIGKILL: no handler runs; the children must go by themselves
            up.wait()
            deadline = time.monotonic() + 30
            while any(alive(p) for p in kids):
                assert time.monotonic() < deadline, [cmdline(p) for p in kids if alive(p)]
                time.sleep(0.5)
        finally:
            if up.poll() is None:
                up.send_signal(signal.SIGINT)
                up.wait(60)


def test_a_worker_that_dies_while_the_cluster_starts_is_restarted():
    """A decode worker killed once it is SERVING, while the gateway starts: `strata
    up` must not wait for a healthy cluster that cannot come (it supervises from the moment
    the gateway answers), restarts the worker, and stops at once on SIGINT."""
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
        "1",
        "--disable-hierarchical-cache",
    ]
    with tempfile.TemporaryFile() as log:
        up = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        try:
            deadline = time.monotonic() + 180
            while True:  # the gateway starts once the worker is SERVING
                kids = children(up.pid)
                if any(" gateway " in cmdline(p) for p in kids):
                    worker = [p for p in kids if " decode " in cmdline(p)]
                    break
                assert up.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            os.kill(worker[0], signal.SIGKILL)
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, up, log, 180)  # "ok": the worker was restarted
            assert ask(url).status_code == 200
            kids = children(up.pid)
            up.send_signal(signal.SIGINT)
            assert up.wait(20) == 0
            assert not any(alive(p) for p in kids)
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()
