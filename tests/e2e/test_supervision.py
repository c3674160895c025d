"""`strata up` supervises its cluster: with a decode worker SIGKILLed while 8 streams run on
it (OpenAI chat with and without usage, /generate, gRPC), every stream goes on on the other
worker and ends with the text of an uncut run; later requests are answered (the gateway
retries one that produced nothing on the other worker, and stops routing to the dead one);
the worker is restarted on its address and serves again; when `strata up` itself is
SIGKILLed, its children die with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from launch.local import _wait_healthy, free_port
from strata.proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

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


STORY = "Tell me a story about a lighthouse keeper."
MAX_TOKENS = 40


def chat_stream(url: str, usage: bool) -> str:
    """An OpenAI chat stream through the official client (it raises on an error event)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model="strata",
        messages=[{"role": "user", "content": STORY}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True} if usage else None,
        extra_body={"ignore_eos": True},
    )
    text, got_usage = [], None
    for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
        got_usage = chunk.usage or got_usage
    if usage:
        assert got_usage is not None and got_usage.completion_tokens == MAX_TOKENS
    return "".join(text)


def generate_stream(url: str) -> str:
    body = {
        "text": STORY,
        "stream": True,
        "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True},
    }
    last = None
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                last = json.loads(line[5:])
    assert last is not None and last["meta_info"]["finish_reason"]["type"] == "length", last
    return last["text"]


def grpc_stream(target: str) -> str:
    params = common_pb2.SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    with grpc.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.GenerateRequest(text=STORY, sampling_params=params)
        chunks = list(stub.GenerateStream(request, timeout=120))
    assert chunks[-1].chunk.finish_reason == common_pb2.FINISH_REASON_LENGTH
    return "".join(c.chunk.text for c in chunks)


def streams(url: str, target: str) -> list:
    """The 8 streams: chat with usage (2) and without (2), /generate (2), gRPC (2)."""
    return [
        *(lambda u=u: chat_stream(url, u) for u in (True, True, False, False)),
        *(lambda: generate_stream(url) for _ in range(2)),
        *(lambda: grpc_stream(target) for _ in range(2)),
    ]


def kill_the_busiest_decode_worker(url: str, decode: list[int]) -> None:
    """Once the 8 streams run: SIGKILL the decode worker running most of them."""
    deadline = time.monotonic() + 60
    while True:
        workers = httpx.get(f"{url}/health", timeout=30).json()["workers"]
        running = {w["worker"]: w.get("running_requests", 0) for w in workers}
        if sum(running.values()) >= 8:
            break
        assert time.monotonic() < deadline, running
        time.sleep(0.05)
    busiest = max(running, key=lambda w: running[w])
    port = busiest.rsplit(":", 1)[1]
    victim = next(p for p in decode if f"--port {port} " in cmdline(p) + " ")
    os.kill(victim, signal.SIGKILL)


def test_killed_worker_restarts_and_children_die_with_up():
    port, grpc_port = free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "launch.cli",
        "up",
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
        "--prefill",
        "0",
        "--decode",
        "2",
        "--disable-hierarchical-cache",
        "--dtype",
        "float32",  # float32: a batch of 8 and a migrated prefill keep the greedy tokens
    ]
    with tempfile.TemporaryFile() as log:
        up = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, up, log, 300)
            assert ask(url).status_code == 200
            decode = sorted(p for p in children(up.pid) if " decode " in cmdline(p))
            assert len(decode) == 2
            runs = streams(url, f"127.0.0.1:{grpc_port}")
            with ThreadPoolExecutor(len(runs)) as pool:  # all at once, each whole
                uncut = [f.result() for f in [pool.submit(run) for run in runs]]
            with ThreadPoolExecutor(len(runs)) as pool:
                cut = [pool.submit(run) for run in runs]
                kill_the_busiest_decode_worker(url, decode)
                assert [f.result() for f in cut] == uncut
            assert httpx.get(f"{url}/health", timeout=30).json()["migrated_requests"] >= 1
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


@pytest.mark.faults
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
