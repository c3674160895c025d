"""L3 in a real Redis shared by two `strata up` clusters (two "hosts": separate processes,
ports and caches; embedded model): a prompt prefilled on one is served from L3 on the other
with the same tokens; corrupt and deleted pages are recomputed, never loaded; with Redis
killed, requests are served (L3 misses) and L3 comes back with Redis; a request's retention
priority keeps its pages from Redis's eviction."""

from __future__ import annotations

import time
from contextlib import ExitStack

import httpx
import pytest

from launch.local import running_cluster, started_together

pytestmark = pytest.mark.slow
LOG = " ".join(f"Entry {i}: the keeper logged wave {i * 17} at dawn." for i in range(40))


@pytest.fixture(scope="module")
def clusters(redis_server):
    if redis_server.proc is None:
        redis_server.start()
    with redis_server.client() as c:
        c.flushdb()
    tiers = ["--hicache-storage-backend", "redis", "--hicache-storage-url", redis_server.url]
    with ExitStack() as stack:
        starts = [running_cluster("--prefill", "0", "--decode", "1", *tiers) for _ in range(2)]
        yield [url for url, _ in started_together(stack, starts)]


def generate(url: str, text: str, **params) -> dict:
    body = {"text": text, "sampling_params": {"max_new_tokens": 8, "temperature": 0, **params}}
    r = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def stored_pages(redis_server, at_least: int) -> int:
    """Wait for the writer threads: the keys in Redis once they stop growing."""
    with redis_server.client() as c:
        deadline, last = time.monotonic() + 30, -1
        while (n := c.dbsize()) != last or n < at_least:
            assert time.monotonic() < deadline, (n, at_least)
            last = n
            time.sleep(0.3)
    return n


def warm_on_first_then_second(clusters, redis_server, text: str) -> tuple[dict, dict]:
    first = generate(clusters[0], text)
    prompt = first["meta_info"]["prompt_tokens"]
    stored_pages(redis_server, prompt // 16 - 1)
    return first, generate(clusters[1], text)


def test_a_prompt_prefilled_on_one_cluster_is_served_from_l3_on_the_other(clusters, redis_server):
    first, second = warm_on_first_then_second(clusters, redis_server, LOG)
    assert first["meta_info"]["cached_tokens_by_tier"]["l3"] == 0
    tiers = second["meta_info"]["cached_tokens_by_tier"]
    assert tiers["l3"] >= first["meta_info"]["prompt_tokens"] - 32, tiers
    assert second["output_ids"] == first["output_ids"]


def test_corrupt_and_deleted_pages_are_recomputed_never_loaded(clusters, redis_server):
    text = LOG.replace("dawn", "dusk")
    first, _ = warm_on_first_then_second(clusters, redis_server, text)
    prompt = first["meta_info"]["prompt_tokens"]

    def again() -> dict:
        for url in clusters:
            assert httpx.post(f"{url}/flush_cache", timeout=30).status_code == 200
        out = generate(clusters[1], text)
        assert out["output_ids"] == first["output_ids"]
        return out

    with redis_server.client() as c:
        keys = c.keys("strata:kv:*")
        for k in keys:  # one flipped byte at the end of every page
            c.setrange(k, c.strlen(k) - 1, b"\x00" if c.getrange(k, -1, -1) != b"\x00" else b"1")
        assert again()["meta_info"]["cached_tokens_by_tier"]["l3"] == 0
        health = httpx.get(f"{clusters[1]}/health", timeout=30).json()
        assert health["radix_cache_stats"]["tiers"]["l3"]["bad_files"] >= 1
        stored_pages(redis_server, prompt // 16 - 1)  # recomputed pages written again
        keys = c.keys("strata:kv:*")
        c.delete(*keys[::2])
    assert again()["meta_info"]["cached_tokens_by_tier"]["l3"] < prompt


def test_with_redis_down_requests_are_served_and_l3_comes_back(clusters, redis_server):
    text = LOG.replace("keeper", "warden")
    redis_server.stop()
    try:
        for url in clusters:
            out = generate(url, text)
            assert out["meta_info"]["cached_tokens_by_tier"]["l3"] == 0
    finally:
        redis_server.start()  # empty: it keeps nothing on disk
    time.sleep(1.5)  # past the stores' quiet time after a failure
    text = LOG.replace("keeper", "pilot")
    first, second = warm_on_first_then_second(clusters, redis_server, text)
    assert second["meta_info"]["cached_tokens_by_tier"]["l3"] > 0
    assert second["output_ids"] == first["output_ids"]


def test_a_prefix_held_by_a_priority_carries_no_expiry_in_redis(clusters, redis_server):
    """Plain pages carry an expiry (volatile-lru may evict them); the pages of a request
    with a retention priority carry none while the hold lasts (strata:held says until when)."""
    with redis_server.client() as c:
        c.flushdb()
        plain = generate(clusters[0], LOG.replace("wave", "tide"))
        stored_pages(redis_server, plain["meta_info"]["prompt_tokens"] // 16 - 1)
        before = set(c.keys("strata:kv:*"))
        assert before and all(c.ttl(k) > 86400 for k in before)
        held = generate(clusters[0], LOG.replace("wave", "swell"), priority=9, priority_ttl=60)
        stored_pages(redis_server, len(before) + held["meta_info"]["prompt_tokens"] // 16 - 2)
        new = set(c.keys("strata:kv:*")) - before
        deadline = time.monotonic() + 10  # the hold follows the writes on the writer thread
        while any(c.ttl(k) != -1 for k in new):
            assert time.monotonic() < deadline, [c.ttl(k) for k in new]
            time.sleep(0.2)
        assert len(new) >= held["meta_info"]["prompt_tokens"] // 16 - 4
        assert c.zcard("strata:held") >= len(new)
