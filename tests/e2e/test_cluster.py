"""The split cluster (`strata up`: cache service, two prefill and two decode workers,
gateway) as real processes over real gRPC and HTTP on loopback. Prompts whose part not
cached on their decode worker exceeds 64 tokens are prefilled on a prefill worker and their
KV sent over gloo; shorter ones are prefilled on the decode worker."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import grpc
import httpx
import pytest

from launch.local import running_cluster, running_server, started_together
from strata.proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.e2e.test_server import health, wait_idle

ROOT = Path(__file__).resolve().parents[2]
STORY = (
    "Here is a long story about a lighthouse keeper who counts the waves every night "
    "and writes each number in a book that nobody reads. "
)
PROMPTS = [
    "The capital of France is",
    "List three colors:",
    "def fibonacci(n):",
    STORY * 3 + "One evening the count",
]


@pytest.fixture(scope="module")
def started():
    """The cluster and, started beside it, a colocated server (the split's oracle)."""
    flags = ("--dtype", "float32", "--num-pages", "512", "--local-prefill-tokens", "64")
    with ExitStack() as stack:
        c, colocated = started_together(
            stack,
            [
                running_cluster("--prefill", "2", "--decode", "2", *flags),
                running_server("--grpc-port", "-1"),
            ],
        )
        yield c, colocated
    with pytest.raises(httpx.HTTPError):  # everything is down after Ctrl-C
        httpx.get(f"{c[0]}/health", timeout=2)


@pytest.fixture(scope="module")
def cluster(started):
    return started[0]


def generate(url: str, text, n: int = 16, ids: bool = False) -> dict:
    body = {
        "input_ids" if ids else "text": text,
        "sampling_params": {"max_new_tokens": n, "temperature": 0},
    }
    resp = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def transfers(url: str) -> int:
    return health(url)["kv_transfer"]["transfers"]


def test_greedy_output_equals_colocated_server(started):
    cluster, colocated = started
    before = transfers(cluster[0])
    split = [generate(cluster[0], p)["output_ids"] for p in PROMPTS]
    assert transfers(cluster[0]) - before == 1  # the long prompt's KV came from a prefill worker
    assert [generate(colocated, p)["output_ids"] for p in PROMPTS] == split


def test_prefill_workers_take_long_prompts_and_decode_workers_short_suffixes(cluster):
    url = cluster[0]
    text = "A fresh prompt no worker has seen: " + "the tide rises and the tide falls. " * 12
    base = httpx.post(f"{url}/tokenize", json={"text": text}).json()["tokens"]
    before = transfers(url)
    first = generate(url, base, 12, ids=True)
    assert transfers(url) == before + 1
    # the next turn: the decode worker holds all but a few tokens, so it prefills them
    follow = base + first["output_ids"] + base[:4]
    second = generate(url, follow, 12, ids=True)
    assert transfers(url) == before + 1
    assert second["meta_info"]["cached_tokens"] >= len(base) // 16 * 16
    metrics = httpx.get(f"{url}/metrics").text
    assert "strata_kv_transfer_bytes_total" in metrics
    sent = [ln for ln in metrics.splitlines() if ln.startswith("strata_kv_transfer_bytes_total")]
    assert float(sent[0].split()[-1]) > 0


def test_requests_sharing_a_prefix_go_to_the_prefill_worker_that_holds_it(cluster):
    url = cluster[0]
    for k in range(3):  # by chance alone all three would land right one time in eight
        shared = f"Shared context number {k}: " + "the quick brown fox jumps over it. " * 8
        one = generate(url, shared + "First question about the fox?", 4)
        question = (
            "A different and much longer second question, about the dog, the fox, the "
            "old wooden bridge and the cold river they both crossed that grey morning "
            "before the farmer woke up and saw them? "
        )
        two = generate(url, shared + question * 3, 4)
        assert one["meta_info"]["cached_tokens"] < 16
        # decode workers lack the new 100+ token suffix: a prefill worker computes it, and
        # the one chosen already holds the shared context
        assert two["meta_info"]["cached_tokens"] >= 64, two["meta_info"]


def test_conversations_stay_on_the_worker_that_holds_them(cluster):
    url = cluster[0]
    # three conversations over two workers: taking turns alone would move them around
    systems = [
        "You are a pirate who answers in rhymes. " * 8,
        "You are a librarian who answers formally. " * 8,
        "You are a chef who answers with recipes. " * 8,
    ]
    history = {i: [{"role": "system", "content": s}] for i, s in enumerate(systems)}
    prev: dict[int, int] = {}
    for turn in range(4):
        for i in history:  # interleaved, so load alone would alternate workers
            history[i].append({"role": "user", "content": f"Question {turn}: tell me more."})
            resp = httpx.post(
                f"{url}/v1/chat/completions",
                timeout=120,
                json={"messages": history[i], "max_tokens": 12, "temperature": 0},
            ).json()
            history[i].append(resp["choices"][0]["message"])
            cached = resp["usage"]["prompt_tokens_details"]["cached_tokens"]
            if turn > 0:
                assert cached >= 0.8 * prev[i], (turn, i, cached, prev[i])
            prev[i] = resp["usage"]["prompt_tokens"]
    workers = [w for w in wait_idle(url)["workers"] if w["role"] == "decode"]
    assert all(w["radix_cache_stats"]["cached_tokens"] > 0 for w in workers), workers


def test_mixed_requests_leave_pools_and_locks_at_baseline(cluster):
    url = cluster[0]

    def one(i: int) -> None:
        if i % 5 == 0:  # bad input: rejected before any worker sees it
            body = {"text": "x", "sampling_params": {"regex": "[a-z", "max_new_tokens": 4}}
            assert httpx.post(f"{url}/generate", json=body, timeout=60).status_code == 400
        elif i % 5 == 1:  # cancelled mid-stream (some while a prefill worker has them)
            body = {
                "text": f"Story {i}: " + "once upon a time, " * (i % 3 * 8),
                "stream": True,
                "sampling_params": {"max_new_tokens": 200, "ignore_eos": True},
            }
            with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        break
        else:
            text = f"Request {i % 7}: say something about the number {i}."
            generate(url, text * (1 + i % 3 * 4), 8)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(25)))
    h = wait_idle(url)
    assert h["kv_transfer"]["transfers"] > 0
    for w in h["workers"]:
        assert w["running_requests"] == 0 and w.get("held_requests", 0) == 0, w
        stats = w["radix_cache_stats"]
        assert w["pages_free"] + stats["cached_pages"] == w["pages_total"], w
        assert stats["locked_pages"] == 0, w


def test_generated_grpc_client_streams_through_the_cluster(cluster):
    with grpc.insecure_channel(cluster[1]) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        req = gateway_pb2.GenerateRequest(
            text=PROMPTS[0],
            sampling_params=common_pb2.SamplingParams(
                max_new_tokens=16,
                temperature=0,
                constraint=common_pb2.Constraint(regex="(Paris|Lyon)\\."),
            ),
        )
        chunks = list(stub.GenerateStream(req, timeout=120))
        assert "".join(c.chunk.text for c in chunks) in ("Paris.", "Lyon.")
        assert chunks[-1].chunk.finish_reason == common_pb2.FINISH_REASON_STOP
        health = json.loads(stub.HealthStats(gateway_pb2.HealthStatsRequest()).json)
        roles = sorted(w["role"] for w in health["workers"])
        assert roles == ["decode", "decode", "prefill", "prefill"]


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
        s += sl.assistant(
            sl.gen(
                "json",
                max_tokens=48,
                temperature=0,
                json_schema={
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 20}},
                    "required": ["city"],
                },
            )
        )

    state = capital.run(backend=sl.RuntimeEndpoint(cluster[0]))
    assert state["city"] == "Paris"
    assert all(-100 < x < 0 for x in state.meta["city"]["scores"])
    assert isinstance(json.loads(state["json"])["city"], str)


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.stem)
def test_examples_run_on_the_cluster(cluster, example):
    fewer = ["--programs", "16"] if example.stem == "batch_programs" else []  # float32, 4 workers
    run = subprocess.run(
        [sys.executable, str(example), "--url", cluster[0], *fewer],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_session_lives_on_one_decode_worker_of_the_cluster(cluster):
    """A session opened at the gateway lives on one decode worker (named in its id): each
    turn goes there, continues the session's tokens and answers what the whole prompt
    would; closing it (or a bad id) is answered as on one server."""
    url = cluster[0]
    sid = httpx.post(f"{url}/open_session", json={"timeout": 60}, timeout=30).json()
    assert "@127.0.0.1:" in sid
    greedy = {"max_new_tokens": 6, "temperature": 0}
    whole: list[int] = []
    for turn in ("The keeper of the light", " wrote that night"):
        ids = httpx.post(f"{url}/tokenize", json={"text": turn}, timeout=30).json()["tokens"]
        body = {"input_ids": ids, "sampling_params": greedy, "session_params": {"id": sid}}
        out = generate_body(url, body)
        assert out["output_ids"] == generate(url, whole + ids, n=6, ids=True)["output_ids"]
        whole += ids + out["output_ids"]
        rid = out["meta_info"]["id"]
    branch = {"input_ids": [11], "sampling_params": greedy}
    branch["session_params"] = {"id": sid, "rid": rid, "offset": -2}
    assert generate_body(url, branch)["meta_info"]["prompt_tokens"] == len(whole) - 2 + 1
    close = {"session_id": sid}
    assert httpx.post(f"{url}/close_session", json=close, timeout=30).status_code == 200
    assert httpx.post(f"{url}/close_session", json=close, timeout=30).status_code == 400
    for bad in (sid, "nope", "x@127.0.0.1:1"):
        body = {"text": "x", "session_params": {"id": bad}}
        assert httpx.post(f"{url}/generate", json=body, timeout=30).status_code == 400, bad


def generate_body(url: str, body: dict) -> dict:
    resp = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()
