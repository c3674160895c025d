"""KV tiers in the split cluster (cache service, two decode workers with a shared L3 store,
gateway; embedded model) as real processes: a conversation's next turn on the other decode
worker loads the first turn's pages from L3; a turn whose pages other traffic pushed down to
its worker's L2 is still routed there; a SIGKILLed cache service fails no request and,
restarted, rebuilds the workers' trees from their snapshots."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import grpc
import httpx
import pytest

from launch.local import free_port, grpc_service, running_http
from services.convert import params_to_proto
from strata.proto.v1 import cache_pb2, cache_pb2_grpc, common_pb2, worker_pb2, worker_pb2_grpc
from strata.sampling.params import SamplingParams

pytestmark = pytest.mark.slow
TURN1 = " ".join(f"Entry {i}: the lighthouse log records wave {i * 13}." for i in range(30))
L1_PAGES = 160  # small enough that a few other prompts push a conversation down to L2
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("l3"))
    tiers = [
        "--enable-hierarchical-cache",
        "--hicache-storage-backend",
        "file",
        "--hicache-storage-dir",
        store,
        "--num-pages",
        str(L1_PAGES),
    ]
    cache_port = free_port()
    with ExitStack() as stack:
        cache, proc = stack.enter_context(
            grpc_service("cache", "--hicache-storage-dir", store, port=cache_port)
        )
        decode = [
            stack.enter_context(grpc_service("decode", "--cache-service", cache, *tiers))[0]
            for _ in range(2)
        ]
        gateway = ["--cache-service", cache, "--decode", ",".join(decode), "--prefill", ""]
        url = stack.enter_context(running_http("gateway", *gateway))
        yield {
            "url": url,
            "cache": cache,
            "cache_proc": proc,
            "cache_port": cache_port,
            "decode": decode,
            "store": store,
            "stack": stack,
        }


def load(target: str) -> worker_pb2.LoadResponse:
    with grpc.insecure_channel(target) as ch:
        return worker_pb2_grpc.DecodeStub(ch).Load(worker_pb2.LoadRequest(), timeout=10)


def generate_on(target: str, ids: list[int]) -> tuple[list[int], common_pb2.Usage]:
    with grpc.insecure_channel(target) as ch:
        req = worker_pb2.WorkerGenerateRequest(
            request_id=f"r{time.monotonic_ns()}",
            prompt_ids=ids,
            sampling_params=params_to_proto(GREEDY),
        )
        chunks = list(worker_pb2_grpc.DecodeStub(ch).Generate(req, timeout=120))
    return [t for c in chunks for t in c.token_ids], chunks[-1].usage


def generate(url: str, text: str) -> dict:
    r = httpx.post(
        f"{url}/generate",
        timeout=120,
        json={"text": text, "sampling_params": {"max_new_tokens": 12, "temperature": 0}},
    )
    assert r.status_code == 200, r.text
    return r.json()


def cache_stats(target: str) -> cache_pb2.StatsResponse:
    with grpc.insecure_channel(target) as ch:
        return cache_pb2_grpc.CacheStub(ch).Stats(cache_pb2.StatsRequest(), timeout=5)


def wait_for(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_next_turn_on_the_other_worker_loads_from_l3(cluster):
    first = generate(cluster["url"], TURN1)
    turn2 = {"text": TURN1 + first["text"] + " Entry 31:"}
    ids = httpx.post(f"{cluster['url']}/tokenize", json=turn2, timeout=30).json()["tokens"]
    owner, other = sorted(cluster["decode"], key=lambda t: -load(t).cache.prompt_tokens)
    assert load(other).cache.prompt_tokens == 0
    wait_for(lambda: cache_stats(cluster["cache"]).l3_pages >= len(ids) // 16 - 1)
    here, _ = generate_on(owner, ids)
    there, usage = generate_on(other, ids)
    assert there == here
    stats, cached_there = load(other).cache, usage.cached_tokens
    assert cached_there >= 16 * 16 and stats.l3_tokens == cached_there, (cached_there, stats)
    assert usage.l3_tokens == cached_there and usage.l2_tokens == 0  # the request says so too
    assert load(other).tiers.bytes_moved["l3_to_l1"] > 0


def test_a_restarted_gateway_sends_the_next_turn_to_the_worker_that_holds_it(cluster):
    """Affinity with no key and no memory in the gateway: a gateway started afresh routes a
    conversation's next turn by the cache service's index, to the worker whose L1 holds it."""
    text = " ".join(f"Note {i}: the tide rose {i * 7} cm at the pier." for i in range(24))
    before = {t: load(t).cache.prompt_tokens for t in cluster["decode"]}
    first = generate(cluster["url"], text)
    grew = [t for t in cluster["decode"] if load(t).cache.prompt_tokens > before[t]]
    assert len(grew) == 1
    owner = grew[0]
    flags = ["--cache-service", cluster["cache"], "--decode", ",".join(cluster["decode"])]
    with running_http("gateway", *flags, "--prefill", "") as fresh:
        before = {t: load(t).cache.prompt_tokens for t in cluster["decode"]}
        second = generate(fresh, text + first["text"] + " Note 24:")
    after = {t: load(t).cache.prompt_tokens for t in cluster["decode"]}
    assert [t for t in after if after[t] > before[t]] == [owner]
    assert second["meta_info"]["cached_tokens"] >= first["meta_info"]["prompt_tokens"] - 16


def test_a_turn_whose_pages_moved_to_l2_goes_back_to_their_worker(cluster):
    """Other users' prompts push a conversation out of its worker's L1 into its L2; the next
    turn is still routed there and loads those pages from L2, not from the shared L3 on the
    other worker (by the cache service's mirror of each worker's tiers, no key)."""
    text = " ".join(f"Log {i}: the keeper trimmed wick number {i * 3}." for i in range(24))
    before = {t: load(t).cache.prompt_tokens for t in cluster["decode"]}
    first = generate(cluster["url"], text)
    owner = next(t for t in cluster["decode"] if load(t).cache.prompt_tokens > before[t])
    ids = httpx.post(f"{cluster['url']}/tokenize", json={"text": text}, timeout=30).json()
    ids = ids["tokens"]
    for i in range(5):  # 5 x 600 tokens of other traffic: more than the owner's L1 holds
        generate_on(owner, [1000 + (i * 611 + j * 7) % 30000 for j in range(600)])

    def moved_to_l2() -> bool:
        with grpc.insecure_channel(cluster["cache"]) as ch:
            reply = cache_pb2_grpc.CacheStub(ch).Route(
                cache_pb2.RouteRequest(token_ids=ids), timeout=5
            )
        held = reply.workers[owner]
        return held.l1_tokens < 16 and held.l2_tokens >= len(ids) - 16

    wait_for(moved_to_l2)
    before = {t: load(t).cache.prompt_tokens for t in cluster["decode"]}
    second = generate(cluster["url"], text + first["text"] + " Log 24:")
    after = {t: load(t).cache.prompt_tokens for t in cluster["decode"]}
    assert [t for t in after if after[t] > before[t]] == [owner]
    tiers = second["meta_info"]["cached_tokens_by_tier"]
    assert tiers["l2"] >= len(ids) - 16 and tiers["l3"] == 0, tiers


def test_cache_service_kill_fails_no_request_and_its_index_is_rebuilt(cluster):
    prompts = [
        f"Question {i}: name a color that starts with the letter {c}."
        for i, c in enumerate("BGRYPOWS")
    ]
    cluster["cache_proc"].send_signal(signal.SIGKILL)
    cluster["cache_proc"].wait(10)
    with ThreadPoolExecutor(8) as pool:  # every request completes without the service
        replies = list(pool.map(lambda p: generate(cluster["url"], p), prompts))
    assert all(r["meta_info"]["finish_reason"]["type"] in ("stop", "length") for r in replies)
    health = httpx.get(f"{cluster['url']}/health", timeout=30).json()
    assert health["cache_service"] == "unreachable" and health["status"] == "ok"
    with grpc_service(
        "cache", "--hicache-storage-dir", cluster["store"], port=cluster["cache_port"]
    ) as (target, _):

        def mirrors_match() -> bool:
            mirrors = cache_stats(target).workers
            for worker in cluster["decode"]:
                tree = load(worker).cache
                m = mirrors.get(worker)
                if m is None or (m.l1_pages, m.l2_pages) != (tree.cached_pages, tree.host_pages):
                    return False
            return True

        wait_for(mirrors_match)
        assert cache_stats(target).l3_pages > 0  # the store was indexed from the directory
        again = generate(cluster["url"], prompts[0])
        assert again["text"] == replies[0]["text"]
        wait_for(mirrors_match)
