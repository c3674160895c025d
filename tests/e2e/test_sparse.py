"""Sparse decode through a real `strata serve` on the embedded model: the sparsity of each
request in /generate meta_info, OpenAI usage, the gRPC response, /metrics and strata.lang;
a short prompt decodes densely; flags that make no sense are refused."""

from __future__ import annotations

import subprocess
import sys
from contextlib import ExitStack

import grpc
import httpx
import pytest

import strata.lang as sl
from launch.local import free_port, running_server, started_together
from strata.proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.slow

LONG = " ".join(
    f"Entry {i}: the {w} keeper logged {i * 13} crates on pier {i % 7}."
    for i, w in enumerate(["harbor", "mill", "forge", "orchard"] * 12)
)
SPARSE = ("--sparse-min-context", "128")  # long enough here: the prompt is ~700 tokens


DENSE = ("--attention-sparsity-threshold", "0", "--sparse-min-context", "128")
# KV tiers with fetch on select, an L1 of 64 pages
TIERED = (*SPARSE, "--enable-hierarchical-cache", "--num-pages", "64", "--sparse-demote-after", "1")


@pytest.fixture(scope="module")
def servers():
    """The sparse (with its gRPC port), dense and tiered servers, started side by side."""
    port = free_port()
    with ExitStack() as stack:
        sparse, dense, tiered = started_together(
            stack,
            [
                running_server(*SPARSE, "--grpc-port", str(port)),
                running_server(*DENSE),
                running_server(*TIERED),
            ],
        )
        yield {"sparse": (sparse, f"127.0.0.1:{port}"), "dense": dense, "tiered": tiered}


@pytest.fixture(scope="module")
def urls(servers):
    return servers["sparse"]


def generate(url: str, text: str) -> dict:
    r = httpx.post(
        f"{url}/generate",
        timeout=300,
        json={
            "text": text,
            "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True},
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["meta_info"]


def test_sparsity_is_reported_by_every_interface(urls):
    url, grpc_addr = urls
    meta = generate(url, LONG + "\nWhich pier had the forge keeper?")
    assert 0 < meta["attention_sparsity_ratio"] < 1, meta
    assert generate(url, "Say hi.")["attention_sparsity_ratio"] == 0  # short: dense

    r = httpx.post(
        f"{url}/v1/chat/completions",
        timeout=300,
        json={
            "messages": [{"role": "user", "content": LONG + "\nSummarise."}],
            "max_tokens": 8,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    assert 0 < r.json()["usage"]["attention_sparsity_ratio"] < 1

    with grpc.insecure_channel(grpc_addr) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        params = common_pb2.SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
        reply = stub.Generate(
            gateway_pb2.GenerateRequest(text=LONG, sampling_params=params), timeout=300
        )
    assert 0 < reply.usage.attention_sparsity_ratio < 1

    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    count = [
        line
        for line in metrics.splitlines()
        if line.startswith("strata_attention_sparsity_ratio_count")
    ]
    assert count and float(count[0].split()[-1]) >= 4  # the REST and gRPC requests above


def test_sparsity_in_strata_lang(urls):
    @sl.function
    def ask(s):
        s += sl.user(LONG + "\nWhich keeper logged the most crates?")
        s += sl.assistant(sl.gen("answer", max_tokens=24, temperature=0, regex="[a-z ]{24,60}"))

    state = ask.run(backend=sl.RuntimeEndpoint(urls[0]))
    ratio = state.get_meta_info("attention_sparsity_ratio")
    assert 0 < ratio < 1
    assert state.get_meta_info("answer")["attention_sparsity_ratio"] == ratio
    assert state.get_metric("attention_sparsity_ratio") == pytest.approx(ratio)


def test_dense_server_reports_zero(servers):
    assert generate(servers["dense"], LONG)["attention_sparsity_ratio"] == 0


@pytest.mark.parametrize(
    "flag,value", [("--attention-sparsity-threshold", "1.5"), ("--sparse-budget", "2.5")]
)
def test_bad_sparse_flags_are_refused(flag, value):
    run = subprocess.run(
        [sys.executable, "-m", "launch.cli", "serve", flag, value],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0 and flag in run.stderr


def test_a_request_that_outgrows_l1_is_answered_with_tiers_on(servers):
    """KV tiers with fetch on select, an L1 of 64 pages, a ~950-token prompt (60 pages) and
    100 new tokens: the request is answered ("length" where the pool ran out; it once waited
    forever to be readmitted), its pages end in the cache, and the fetch-on-select counters
    are on /health and /metrics."""
    url = servers["tiered"]
    r = httpx.post(
        f"{url}/generate",
        timeout=300,
        json={
            "text": LONG + "\nList the piers.",
            "sampling_params": {"max_new_tokens": 100, "temperature": 0, "ignore_eos": True},
        },
    )
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    assert meta["finish_reason"]["type"] == "length"
    assert 64 * 16 - meta["prompt_tokens"] - 8 <= meta["completion_tokens"] <= 100
    health = httpx.get(f"{url}/health", timeout=30).json()
    stats = health["radix_cache_stats"]
    assert set(stats["tiers"]["fetch_on_select"]) == {"demoted_pages", "fetched_pages"}
    assert stats["locked_pages"] == 0
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    assert 'strata_kv_fetch_on_select_pages_total{kind="demoted"}' in metrics
