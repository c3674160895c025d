"""64 concurrent streaming clients for 60 s against a real `strata serve` on loopback: chat
streams of varied length over shared and distinct prefixes, one in eight cut off by its client
mid-stream, one in sixteen a bad request. Every stream must end with a finish reason and
[DONE], or with an error event, or be refused with a 4xx: none lost, none hanging. Memory
must be steady (the server's RSS, front and engine process, at the end vs after a warm-up
round) and every KV page free or the cache's at the end."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path

import httpx

from launch.local import running_server
from reliability.conftest import figure

CLIENTS = 64
SECONDS = 60.0
STREAM_TIMEOUT = 120.0  # a stream that takes longer has hung
TOPICS = ["tides", "bread", "comets", "chess", "bees", "rivers", "glass", "owls"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


async def one_stream(http: httpx.AsyncClient, url: str, rng: random.Random) -> str:
    """One request; returns its outcome: completed, cut (by us), error_event, refused_4xx,
    or lost (ended without a finish, an error or [DONE])."""
    topic = rng.choice(TOPICS)
    system = f"You answer questions about {topic} in one short paragraph."
    ask = f"Tell me fact {rng.randint(1, 40)} about {topic}."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": ask}]
    body: dict = {
        "messages": messages,
        "max_tokens": rng.choice([8, 16, 32, 48]),
        "temperature": rng.choice([0, 0.8]),
        "stream": True,
    }
    if rng.random() < 1 / 16:
        body["max_tokens"] = -1  # a bad request
    cut = rng.random() < 1 / 8
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if 400 <= r.status_code < 500:
            await r.aread()
            return "refused_4xx"
        if r.status_code != 200:
            return f"http_{r.status_code}"
        finished = done = errored = False
        chunks = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                errored = True
                continue
            chunks += 1
            if any(c.get("finish_reason") for c in event.get("choices", [])):
                finished = True
            if cut and chunks >= 3:
                return "cut"
    if errored:
        return "error_event"
    return "completed" if finished and done else "lost"


async def client(url: str, seed: int, until: float, outcomes: Counter) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=STREAM_TIMEOUT) as http:
        while time.monotonic() < until:
            try:
                outcome = await asyncio.wait_for(one_stream(http, url, rng), STREAM_TIMEOUT)
            except asyncio.TimeoutError:
                outcome = "hung"
            except httpx.HTTPError as exc:
                outcome = f"transport_{type(exc).__name__}"
            outcomes[outcome] += 1


async def load(url: str, seconds: float, clients: int = CLIENTS) -> Counter:
    outcomes: Counter = Counter()
    until = time.monotonic() + seconds
    await asyncio.gather(*(client(url, i, until, outcomes) for i in range(clients)))
    return outcomes


def settle(url: str) -> dict:
    deadline = time.monotonic() + 60
    while True:
        health = httpx.get(f"{url}/health", timeout=30).json()
        if health["running_requests"] == 0 and health["waiting_requests"] == 0:
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.5)


def test_64_streams_for_60_seconds_lose_nothing_and_leak_nothing():
    flags = ("--max-running-requests", "32", "--max-queued-requests", "64")
    with running_server(*flags) as url:
        engine_pid = httpx.get(f"{url}/health", timeout=30).json()["engine"]["pid"]
        pids = {"front": parent(engine_pid), "engine": engine_pid}
        warm = asyncio.run(load(url, 10.0))  # the first requests build caches and buffers
        settle(url)
        before = {name: rss_mb(pid) for name, pid in pids.items()}
        start = time.monotonic()
        outcomes = asyncio.run(load(url, SECONDS))
        elapsed = time.monotonic() - start
        health = settle(url)
        after = {name: rss_mb(pid) for name, pid in pids.items()}
    stats = health["radix_cache_stats"]
    figure(
        "load requests",
        f"{sum(outcomes.values())} in {elapsed:.0f} s by {CLIENTS} clients "
        f"(warm-up {sum(warm.values())})",
    )
    figure("load outcomes", dict(sorted(outcomes.items())))
    figure("load rss MB before/after", {n: f"{before[n]:.0f} / {after[n]:.0f}" for n in pids})
    figure(
        "load pages at end",
        f"{health['pages_free']} free + {stats['cached_pages']} cached "
        f"of {health['pages_total']}, {stats['locked_pages']} locked",
    )
    assert set(outcomes) <= {"completed", "cut", "error_event", "refused_4xx"}, outcomes
    assert outcomes["completed"] > CLIENTS
    assert stats["locked_pages"] == 0
    assert health["pages_free"] + stats["cached_pages"] == health["pages_total"]
    for name in pids:  # steady: at most 10% (and 150 MB) above the warmed-up figure
        assert after[name] <= before[name] * 1.10 + 150, (name, before, after)
