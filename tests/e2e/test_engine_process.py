"""`strata serve` runs its engine in a process of its own, the step loop on that process's
main thread; a stream cut by that process's death ends with an error event (never a silent
end), and the server exits non-zero so a supervisor restarts it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

import httpx

from launch.local import _wait_healthy, free_port


def test_engine_death_ends_streams_with_an_error_and_stops_the_server():
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "launch.cli",
        "serve",
        "--port",
        str(port),
        "--grpc-port",
        "-1",
        "--dtype",
        "float32",
    ]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc, log, 180)
            engine_pid = httpx.get(f"{url}/get_server_info", timeout=10).json()["engine_pid"]
            assert engine_pid != proc.pid
            engine = httpx.get(f"{url}/health", timeout=10).json()["engine"]
            assert engine == {"pid": engine_pid, "loop_thread": "MainThread"}
            with open(f"/proc/{engine_pid}/environ", "rb") as f:  # what it started with
                environ = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            assert b"glibc.malloc.hugetlb=1" in environ[b"GLIBC_TUNABLES"]
            assert environ[b"GOMP_SPINCOUNT"] == b"20000"
            body = {
                "text": "Tell me a long story.",
                "stream": True,
                "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True},
            }
            events = []
            with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    events.append(line[5:].strip())
                    if len(events) == 3:
                        os.kill(engine_pid, signal.SIGKILL)
            assert len(events) < 2000
            last = json.loads(events[-2] if events[-1] == "[DONE]" else events[-1])
            assert last["meta_info"]["finish_reason"]["type"] == "error"
            assert "engine process exited" in last["meta_info"]["finish_reason"]["message"]
            assert proc.wait(30) == 3
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
