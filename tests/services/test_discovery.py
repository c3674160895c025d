"""Discovery: workers register at the cache service with a heartbeat and the gateway follows
the registry (real processes, tiny model): a new worker gets traffic within 2 s of serving,
one that stops heartbeating leaves routing when its entry expires, one that stops cleanly
leaves at once; a `dns:NAME:PORT` entry routes to every address the name has."""

from __future__ import annotations

import os
import signal
import time
from contextlib import ExitStack

import grpc
import httpx
import pytest

from launch.local import free_port, grpc_service, running_http, started_together
from strata.cache.registry import SETTLE_S, WorkerRegistry
from strata.model.loader import load_tokenizer, resolve_checkpoint
from strata.proto.v1 import cache_pb2, cache_pb2_grpc
from tests.conftest import tiny_hf_model


def test_registry_entries_live_by_heartbeat_and_leave_on_ttl_or_at_once():
    now = [0.0]
    reg = WorkerRegistry(clock=lambda: now[0])
    reg.beat("10.0.0.1:30020", "decode", 3.0)
    reg.beat("10.0.0.2:30021", "prefill", 3.0)
    now[0] = 2.0
    reg.beat("10.0.0.1:30020", "decode", 3.0)  # renewed; its age goes on
    now[0] = 4.0
    assert [(w.address, w.role, w.age) for w in reg.live()] == [("10.0.0.1:30020", "decode", 4.0)]
    reg.beat("10.0.0.1:30020", "decode", 0)  # a clean stop
    assert reg.live() == []
    for bad in (
        ("", "decode", 1),
        ("host", "decode", 1),
        ("h:1", "cache", 1),
        ("h:1", "decode", -1),
    ):
        with pytest.raises(ValueError):
            reg.beat(*bad)


def test_a_young_registry_says_it_is_settling_and_names_who_left():
    now = [0.0]
    reg = WorkerRegistry(clock=lambda: now[0])  # a restarted cache service
    reg.beat("10.0.0.1:30020", "decode", 3.0)
    reg.beat("10.0.0.2:30020", "decode", 3.0)
    reg.beat("10.0.0.2:30020", "decode", 0)  # left cleanly
    now[0] = 1.0
    seen = reg.snapshot()
    assert seen.settling and [w.address for w in seen.live] == ["10.0.0.1:30020"]
    assert seen.gone == ["10.0.0.2:30020"]
    now[0] = 4.0  # 10.0.0.1 expired: gone too
    assert reg.snapshot().gone == ["10.0.0.1:30020", "10.0.0.2:30020"]
    reg.beat("10.0.0.1:30020", "decode", 3.0)  # back
    assert reg.snapshot().gone == ["10.0.0.2:30020"]
    now[0] = SETTLE_S
    seen = reg.snapshot()
    assert not seen.settling and seen.gone == [] and len(seen.live) == 1


def generate(url: str) -> httpx.Response:
    body = {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 2}}
    return httpx.post(f"{url}/generate", json=body, timeout=30)


def workers(url: str) -> list[str]:
    return httpx.get(f"{url}/get_server_info", timeout=30).json()["decode_workers"]


def until(check, limit: float) -> float:
    """Seconds until check() holds (fails past limit)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < limit, "not within the limit"
        time.sleep(0.05)
    took = time.monotonic() - start
    assert took < limit, took
    return took


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    tiny_hf_model("llama").save_pretrained(folder)
    load_tokenizer(resolve_checkpoint(None)).save_pretrained(folder)
    return ["--model-path", str(folder), "--dtype", "float32", "--page-size", "4"]


def test_the_gateway_follows_the_registry_and_dns(model):
    with ExitStack() as stack:
        cache, cache_proc = stack.enter_context(grpc_service("cache"))
        follow = ["--cache-service", cache, "--decode", "", "--discovery", "registry"]
        port = free_port()  # the worker's, to come: a DNS name resolves to it meanwhile
        named = ["--cache-service", cache, "--decode", f"dns:localhost:{port}"]
        url, dns = started_together(
            stack,
            [running_http("gateway", *model, *follow), running_http("gateway", *model, *named)],
        )
        refused = generate(url)
        assert refused.status_code == 429 and "registered" in refused.text
        worker = ["decode", "--cache-service", cache, *model, "--num-pages", "64"]
        target, proc = stack.enter_context(grpc_service(*worker, port=port))
        joined = until(lambda: generate(url).status_code == 200, 2.0)  # serving -> traffic
        assert workers(url) == [target]
        os.kill(proc.pid, signal.SIGSTOP)  # alive but silent: no heartbeat, no health
        try:
            left = until(lambda: workers(url) == [], 6.0)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        back = until(lambda: workers(url) == [target], 3.0)
        assert generate(dns).status_code == 200 and f"127.0.0.1:{port}" in workers(dns)
        cache_proc.kill()  # without the registry the gateway keeps the workers it knows
        time.sleep(1.5)
        assert generate(url).status_code == 200 and workers(url) == [target]
        port = int(cache.rsplit(":", 1)[1])
        # back, and settling: the gateway keeps its workers until they re-register
        stack.enter_context(grpc_service("cache", port=port))
        for _ in range(8):
            assert workers(url) == [target]
            time.sleep(0.25)
        registry = cache_pb2_grpc.CacheStub(stack.enter_context(grpc.insecure_channel(cache)))

        def listed() -> list[str]:
            return [w.address for w in registry.Workers(cache_pb2.WorkersRequest()).workers]

        rejoined = 2.0 + until(lambda: listed() == [target], 4.0)
        proc.terminate()  # a clean stop leaves the registry at once
        gone = until(lambda: workers(url) == [], 2.0)
        print(
            f"FIGURE discovery: traffic {joined:.2f} s after a worker serves; a silent worker "
            f"leaves routing after {left:.2f} s (TTL 3 s), back {back:.2f} s after it resumes; "
            f"a stopping worker leaves after {gone:.2f} s; it re-registered by {rejoined:.2f} s "
            "after the cache service restarted"
        )
