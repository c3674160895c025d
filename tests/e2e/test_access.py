"""Access control and overload on a real `strata serve`: the API key over REST and gRPC,
open or protected health, and a full queue answered with 429 / RESOURCE_EXHAUSTED (and the
server taking requests again once it drains)."""

from __future__ import annotations

import socket
import threading
from contextlib import ExitStack

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from launch.local import free_port, running_cluster, running_server, started_together
from strata.proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.slow

KEY = "test-key-7f3a"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def started():
    """Started side by side: a keyed server that holds one request, a keyed one whose
    /health is protected, and a split cluster that holds one request a worker."""
    port = free_port()
    one = ("--max-running-requests", "1", "--max-queued-requests", "0")
    split = ("--prefill", "0", "--decode", "1", "--disable-hierarchical-cache")
    with ExitStack() as stack:
        keyed, protected, (gateway, _) = started_together(
            stack,
            [
                running_server("--api-key", KEY, "--grpc-port", str(port), *one),
                running_server("--api-key", KEY, "--protect-health"),
                running_cluster(*split, *one),
            ],
        )
        yield {"keyed": (keyed, f"127.0.0.1:{port}"), "protected": protected, "split": gateway}


@pytest.fixture(scope="module")
def urls(started):
    return started["keyed"]


def chat(url: str, headers: dict | None = None, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        headers=headers or {},
        timeout=300,
        json={
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    )


def test_rest_needs_the_key_health_and_metrics_stay_open(urls):
    url, _ = urls
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = chat(url, headers)
        assert r.status_code == 401, r.text
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
    assert chat(url, AUTH).status_code == 200
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{url}/metrics", timeout=30).status_code == 200


def test_grpc_needs_the_key_health_stays_open(urls):
    _, addr = urls
    params = common_pb2.SamplingParams(max_new_tokens=2, temperature=0)
    req = gateway_pb2.GenerateRequest(text="Hello", sampling_params=params)
    with grpc.insecure_channel(addr) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(req, timeout=60, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                list(stub.GenerateStream(req, timeout=60, metadata=metadata))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.Generate(req, timeout=120, metadata=(("authorization", f"Bearer {KEY}"),))
        assert reply.usage.completion_tokens == 2
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=30
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_a_full_server_answers_429_and_recovers(urls):
    url, addr = urls
    started = threading.Event()
    done: list[httpx.Response] = []

    def long_request():
        body = {
            "text": "Count slowly.",
            "stream": True,
            "sampling_params": {"max_new_tokens": 64, "temperature": 0, "ignore_eos": True},
        }
        with httpx.stream("POST", f"{url}/generate", json=body, headers=AUTH, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    started.set()
            done.append(r)

    runner = threading.Thread(target=long_request)
    runner.start()
    assert started.wait(120)
    r = chat(url, AUTH)  # one running, none may wait
    assert r.status_code == 429, r.text
    assert r.headers["Retry-After"] == "1" and r.json()["error"]["type"] == "overloaded_error"
    with grpc.insecure_channel(addr) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        req = gateway_pb2.GenerateRequest(
            text="Hi", sampling_params=common_pb2.SamplingParams(max_new_tokens=2)
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(req, timeout=60, metadata=(("authorization", f"Bearer {KEY}"),))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    runner.join(300)
    assert done and done[0].status_code == 200
    assert chat(url, AUTH).status_code == 200  # drained: the count went back down
    health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["running_requests"] == health["waiting_requests"] == 0


def test_protected_health_needs_the_key(started):
    url = started["protected"]
    for path in ("/health", "/metrics"):
        assert httpx.get(f"{url}{path}", timeout=30).status_code == 401
        assert httpx.get(f"{url}{path}", headers=AUTH, timeout=30).status_code == 200


def test_oversized_bodies_and_messages_are_refused(urls):
    url, addr = urls
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:  # the headers alone
        s.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 20000000\r\n\r\n"
        )
        assert s.recv(4096).split(b"\r\n", 1)[0].endswith(b"413 Request Entity Too Large")

    def chunks():  # no Content-Length: sent in chunks, 17 MiB of them
        yield b'{"text": "'
        for _ in range(17):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    r = httpx.post(f"{url}/generate", content=chunks(), headers=AUTH, timeout=60)
    assert r.status_code == 413, r.text
    assert "exceeds" in r.json()["error"]["message"]
    big = gateway_pb2.GenerateRequest(text="x" * (17 * 1024 * 1024))
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(addr, options=options) as channel:
        with pytest.raises(grpc.RpcError) as err:
            gateway_pb2_grpc.GatewayStub(channel).Generate(
                big, timeout=60, metadata=(("authorization", f"Bearer {KEY}"),)
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_gateway_bounds_what_it_holds(started):
    """Split mode: the gateway refuses past workers x (running + queued) itself, before a
    worker is asked (its own message), and takes requests again once they finish."""
    url = started["split"]
    streaming = threading.Event()
    done: list[int] = []

    def long_request():
        body = {
            "text": "Count slowly.",
            "stream": True,
            "sampling_params": {"max_new_tokens": 48, "temperature": 0, "ignore_eos": True},
        }
        with httpx.stream("POST", f"{url}/generate", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    streaming.set()
            done.append(r.status_code)

    runner = threading.Thread(target=long_request)
    runner.start()
    assert streaming.wait(120)
    r = chat(url)
    assert r.status_code == 429 and "the gateway holds" in r.json()["error"]["message"]
    runner.join(300)
    assert done == [200] and chat(url).status_code == 200
