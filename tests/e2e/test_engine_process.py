"""`strata serve` runs its engine in a process of its own, the step loop on that process's
main thread; a stream cut by that process's death ends with an error event (never a silent
end; on OpenAI's routes one the official client raises on), and the server exits non-zero so
a supervisor restarts it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

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
            chatting = threading.Event()
            with ThreadPoolExecutor(1) as pool:
                chat = pool.submit(chat_until_it_fails, url, chatting)
                assert chatting.wait(60)
                events = generate_until_killed(url, body, engine_pid)
                error = chat.result()
            assert len(events) < 2000
            last = json.loads(events[-2] if events[-1] == "[DONE]" else events[-1])
            assert last["meta_info"]["finish_reason"]["type"] == "error"
            assert "engine process exited" in last["meta_info"]["finish_reason"]["message"]
            # the official OpenAI client raises on the cut stream's error event
            assert isinstance(error, openai.APIError) and "engine process exited" in str(error)
            assert proc.wait(30) == 3
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def chat_until_it_fails(url: str, chatting: threading.Event) -> BaseException | None:
    """A streamed chat with usage through the official client (chatting: set at its first
    chunk); what it raised."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    try:
        for _ in client.chat.completions.create(
            model="strata",
            messages=[{"role": "user", "content": "Tell me a long story."}],
            max_tokens=2000,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        ):
            chatting.set()
    except openai.APIError as exc:
        return exc
    return None


def generate_until_killed(url: str, body: dict, engine_pid: int) -> list[str]:
    """A /generate stream's events; the engine process is SIGKILLed at the third."""
    events = []
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            events.append(line[5:].strip())
            if len(events) == 3:
                os.kill(engine_pid, signal.SIGKILL)
    return events
