"""The split cluster (`strata up`: cache service, two decode workers, gateway) as real
processes over real gRPC and HTTP on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest

from strata.proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.e2e.server import running_cluster, running_server
from tests.e2e.test_server import wait_idle

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The capital of France is", "List three colors:", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def cluster():
    with running_cluster("--decode", "2", "--dtype", "float32", "--num-pages", "512") as c:
        yield c
    with pytest.raises(httpx.HTTPError):  # everything is down after Ctrl-C
        httpx.get(f"{c[0]}/health", timeout=2)


def generate(url: str, text: str, n: int = 16) -> dict:
    body = {"text": text, "sampling_params": {"max_new_tokens": n, "temperature": 0}}
    resp = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_greedy_output_equals_colocated_server(cluster):
    split = [generate(cluster[0], p)["output_ids"] for p in PROMPTS]
    with running_server("--grpc-port", "-1") as colocated:
        assert [generate(colocated, p)["output_ids"] for p in PROMPTS] == split


def test_conversations_stay_on_the_worker_that_holds_them(cluster):
    url = cluster[0]
    # three conversations over two workers: taking turns alone would move them around
    systems = ["You are a pirate who answers in rhymes. " * 8,
               "You are a librarian who answers formally. " * 8,
               "You are a chef who answers with recipes. " * 8]  # fmt: skip
    history = {i: [{"role": "system", "content": s}] for i, s in enumerate(systems)}
    prev: dict[int, int] = {}
    for turn in range(4):
        for i in history:  # interleaved, so load alone would alternate workers
            history[i].append({"role": "user", "content": f"Question {turn}: tell me more."})
            resp = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                "messages": history[i], "max_tokens": 12, "temperature": 0}).json()  # fmt: skip
            history[i].append(resp["choices"][0]["message"])
            cached = resp["usage"]["prompt_tokens_details"]["cached_tokens"]
            if turn > 0:
                assert cached >= 0.8 * prev[i], (turn, i, cached, prev[i])
            prev[i] = resp["usage"]["prompt_tokens"]
    workers = wait_idle(url)["workers"]
    assert all(w["radix_cache_stats"]["cached_tokens"] > 0 for w in workers), workers


def test_mixed_requests_leave_pools_and_locks_at_baseline(cluster):
    url = cluster[0]

    def one(i: int) -> None:
        if i % 5 == 0:  # bad input: rejected before any worker sees it
            body = {"text": "x", "sampling_params": {"regex": "[a-z", "max_new_tokens": 4}}
            assert httpx.post(f"{url}/generate", json=body, timeout=60).status_code == 400
        elif i % 5 == 1:  # cancelled mid-stream
            body = {"text": f"Story {i}:", "stream": True,
                    "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}  # fmt: skip
            with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        break
        else:
            generate(url, f"Request {i % 7}: say something about the number {i}.", 8)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(40)))
    h = wait_idle(url)
    for w in h["workers"]:
        stats = w["radix_cache_stats"]
        assert w["pages_free"] + stats["cached_pages"] == w["pages_total"], w
        assert stats["locked_pages"] == 0, w


def test_generated_grpc_client_streams_through_the_cluster(cluster):
    with grpc.insecure_channel(cluster[1]) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        req = gateway_pb2.GenerateRequest(
            text=PROMPTS[0], sampling_params=common_pb2.SamplingParams(
                max_new_tokens=16, temperature=0,
                constraint=common_pb2.Constraint(regex="(Paris|Lyon)\\.")))  # fmt: skip
        chunks = list(stub.GenerateStream(req, timeout=120))
        assert "".join(c.chunk.text for c in chunks) in ("Paris.", "Lyon.")
        assert chunks[-1].chunk.finish_reason == common_pb2.FINISH_REASON_STOP
        health = json.loads(stub.HealthStats(gateway_pb2.HealthStatsRequest()).json)
        assert len(health["workers"]) == 2


def test_up_refuses_prefill_workers_clearly():
    run = subprocess.run([sys.executable, "-m", "strata.cli", "up", "--prefill", "1"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2 and "prefill workers are not built yet" in run.stderr


def test_dsl_select_and_constraints_through_the_cluster(cluster):
    import strata.lang as sl

    @sl.function
    def capital(s):
        s += sl.user("What is the capital of France? Then give it as JSON.")
        s += sl.assistant(
            [
                "The capital of France is ",
                sl.select("city", choices=["Paris", "a village on the moon", "Berlin"]),
            ]
        )
        s += sl.assistant(sl.gen("json", max_tokens=48, temperature=0, json_schema={
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"]}))  # fmt: skip

    state = capital.run(backend=sl.RuntimeEndpoint(cluster[0]))
    assert state["city"] == "Paris"
    assert all(-100 < x < 0 for x in state.meta["city"]["scores"])
    assert isinstance(json.loads(state["json"])["city"], str)


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.stem)
def test_examples_run_on_the_cluster(cluster, example):
    run = subprocess.run([sys.executable, str(example), "--url", cluster[0]], capture_output=True,
                         text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
