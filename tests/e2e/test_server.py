"""`strata serve` as a real process, driven over loopback HTTP by real clients."""

from __future__ import annotations

import json
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from launch.local import running_server

ROOT = Path(__file__).resolve().parents[2]

SYSTEM = "You are a concise assistant who answers in one short sentence. " * 6
QUESTION = "Name three primary colors."


@pytest.fixture(scope="module")
def url():
    with running_server() as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=120)


def chat(client, question: str = QUESTION, **kw):
    return client.chat.completions.create(
        model="strata",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        max_tokens=kw.pop("max_tokens", 20),
        temperature=0,
        **kw,
    )


def health(url) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def wait_idle(url, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = health(url)
        # split mode: every worker idle, no prefill worker holding pages for a pull
        busy = [
            w
            for w in h.get("workers", [])
            if w.get("running_requests") or w.get("waiting_requests") or w.get("held_requests")
        ]
        if h["running_requests"] == 0 and h["waiting_requests"] == 0 and not busy:
            return h
        assert time.monotonic() < deadline, h
        time.sleep(0.1)


def test_openai_client_completion_chat_and_streaming(client):
    models = client.models.list()
    assert models.data[0].id
    comp = client.completions.create(
        model="strata", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert "Paris" in comp.choices[0].text
    assert comp.usage.completion_tokens == 8 and comp.choices[0].finish_reason == "length"
    reply = chat(client)
    text = reply.choices[0].message.content
    assert text and reply.usage.prompt_tokens > 80
    stream = client.chat.completions.create(
        model="strata",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_same_greedy_output_cold_warm_batched_and_without_cache(url, client):
    httpx.post(f"{url}/flush_cache", timeout=10)
    question = "Describe the ocean in one sentence."
    cold = chat(client, question)
    warm = chat(client, question)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert warm.usage.prompt_tokens_details.cached_tokens > 0
    # strata's extra field: where the prompt's tokens came from (L1 only here: no tiers)
    cached, prompt = warm.usage.prompt_tokens_details.cached_tokens, warm.usage.prompt_tokens
    by_tier = warm.usage.prompt_tokens_details.model_extra["by_tier"]
    assert by_tier == {"l1": cached, "l2": 0, "l3": 0, "computed": prompt - cached}
    others = [f"Give me a fact about the number {i}." for i in range(15)]
    with ThreadPoolExecutor(16) as pool:
        batch = list(pool.map(lambda q: chat(client, q), [question, *others]))
    with running_server("--disable-radix-cache") as plain_url:
        plain = openai.OpenAI(base_url=f"{plain_url}/v1", api_key="none", timeout=120)
        uncached = chat(plain, question)
        assert uncached.usage.prompt_tokens_details.cached_tokens == 0
        assert health(plain_url)["radix_cache_stats"] == {"enabled": False}
    texts = {r.choices[0].message.content for r in (cold, warm, batch[0], uncached)}
    assert len(texts) == 1, texts


def test_curl_generate_both_forms_and_health(url):
    def curl(*args: str) -> dict:
        out = subprocess.run(
            ["curl", "-s", "--max-time", "60", *args], capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout)

    full = curl(
        f"{url}/generate",
        "-d",
        json.dumps(
            {
                "text": "The capital of France is",
                "sampling_params": {"max_new_tokens": 6, "temperature": 0},
            }
        ),
    )
    short = curl(
        f"{url}/generate",
        "-d",
        json.dumps({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}),
    )
    assert full["text"] == short["text"] and "Paris" in full["text"]
    assert full["meta_info"]["completion_tokens"] == 6
    for out in (full, short):  # the seeds' short form documents usage
        assert out["usage"]["completion_tokens"] == 6 and out["usage"]["prompt_tokens"] > 0
    h = curl(f"{url}/health")
    stats = h["radix_cache_stats"]
    for key in (
        "total_nodes",
        "shared_prefix_count",
        "avg_sharing_depth",
        "hit_rate",
        "l1_hit_rate",
        "l2_hit_rate",
    ):
        assert key in stats
    assert stats["total_nodes"] > 0 and 0 < stats["hit_rate"] <= 1


def test_cancelled_stream_frees_its_pages(url):
    base = wait_idle(url)
    body = {
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=60) as http:
        r = http.send(
            http.build_request("POST", f"{url}/v1/chat/completions", json=body), stream=True
        )
        assert r.status_code == 200
        lines = r.iter_lines()
        events = [next(lines) for _ in range(12)]
        assert sum(e.startswith("data:") for e in events) == 6
        during = health(url)
        assert during["running_requests"] == 1
        assert during["radix_cache_stats"]["locked_pages"] > 0 or during["pages_free"] < (
            during["pages_total"] - during["radix_cache_stats"]["cached_pages"]
        )
        r.close()  # the client goes away mid-generation
    after = wait_idle(url)
    stats = after["radix_cache_stats"]
    assert stats["locked_pages"] == 0
    # every page is free or held by the cache (which may keep the cancelled prefix)
    assert after["pages_free"] + stats["cached_pages"] == after["pages_total"]
    assert base["pages_free"] + base["radix_cache_stats"]["cached_pages"] == base["pages_total"]


@pytest.mark.parametrize(
    "path,body,needle",
    [
        ("/v1/chat/completions", {"messages": []}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
            "max_tokens",
        ),
        ("/v1/completions", {"prompt": "hi", "n": 17}, "n"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
        ("/v1/completions", {"prompt": [999999999], "max_tokens": 2}, "token ids"),
        ("/generate", {"text": "hi " * 9000}, "context length"),
        ("/generate", {"sampling_params": {}}, "text"),
        ("/generate", {"text": "half a pair \ud800"}, "surrogate"),  # found by schemathesis
    ],
)
def test_bad_input_gets_a_clear_400_and_leaks_nothing(url, path, body, needle):
    # NOTE: json.dumps escapes a lone surrogate (httpx's json= cannot encode it)
    r = httpx.post(
        f"{url}{path}",
        content=json.dumps(body),
        timeout=30,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    after = wait_idle(url)
    assert after["radix_cache_stats"]["locked_pages"] == 0


def test_metrics_and_flush_cache(url, client):
    chat(client, "One more question?", max_tokens=4)
    text = httpx.get(f"{url}/metrics", timeout=10).text
    names = [
        "strata_requests_total",
        "strata_time_to_first_token_seconds_bucket",
        "strata_cache_hit_rate",
        "strata_kv_pages_used",
        "strata_generation_tokens_total",
    ]
    for name in names:
        assert name in text
    # per-request histograms under vLLM / SGLang dashboard names, and every metric the
    # Grafana dashboard in deploy/grafana queries exists
    per_request = (
        "strata_e2e_request_latency_seconds",
        "strata_time_per_output_token_seconds",
        "strata_request_queue_time_seconds",
        "strata_request_prompt_tokens",
        "strata_request_generation_tokens",
    )
    for name in per_request:
        assert re.search(rf"^{name}_count [1-9]", text, re.M), name
    samples = {re.split(r"[{ ]", line)[0] for line in text.splitlines() if line[:1] != "#"}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "strata.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {m for e in exprs for m in re.findall(r"strata_\w+", e)}
    tiers_only = {"strata_kv_tier_moved_bytes_total"}  # this server runs L1 only
    assert used and used - tiers_only <= samples, used - tiers_only - samples
    flushed = httpx.post(f"{url}/flush_cache", timeout=10).json()
    assert flushed["flushed_pages"] > 0
    h = health(url)
    assert h["pages_free"] == h["pages_total"]


def test_generate_batches_abort_by_rid_and_server_info(url):
    texts = ["The capital of France is", "Two plus two is"]
    sp = {"max_new_tokens": 5, "temperature": 0}
    batch = httpx.post(
        f"{url}/generate", json={"text": texts, "sampling_params": sp}, timeout=120
    ).json()
    singles = [
        httpx.post(f"{url}/generate", json={"text": t, "sampling_params": sp}, timeout=120).json()
        for t in texts
    ]
    assert [b["text"] for b in batch] == [s["text"] for s in singles]
    assert all(b["usage"]["completion_tokens"] == 5 for b in batch)
    bad = httpx.post(f"{url}/generate", json={"text": texts, "stream": True}, timeout=30)
    assert bad.status_code == 400 and "batch" in bad.json()["error"]["message"]

    body = {
        "text": "Count to a thousand:",
        "rid": "abort-me",
        "stream": True,
        "sampling_params": {"max_new_tokens": 200, "ignore_eos": True},
    }
    events = []
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            events.append(json.loads(line[5:]))
            if len(events) == 1:
                found = httpx.post(f"{url}/abort_request", json={"rid": "abort-me"}, timeout=30)
                assert found.json() == {"rid": "abort-me", "found": True}
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(events[-1]["output_ids"]) < 200
    missing = httpx.post(f"{url}/abort_request", json={"rid": "no-such"}, timeout=30).json()
    assert missing["found"] is False
    wait_idle(url)

    info = httpx.get(f"{url}/get_server_info", timeout=30).json()
    assert info["page_size"] == 16 and info["max_total_num_tokens"] > 0 and info["version"]


def test_openai_n_choices_streamed_and_not(url, client):
    """n samples of one prompt: greedy choices agree; seeded ones are reproducible; the
    prompt is counted once in usage and computed once (the others hit the cache)."""
    greedy = chat(client, n=3, max_tokens=8)
    texts = [c.message.content for c in greedy.choices]
    assert [c.index for c in greedy.choices] == [0, 1, 2] and len(set(texts)) == 1
    single = chat(client, max_tokens=8)
    assert greedy.usage.prompt_tokens == single.usage.prompt_tokens
    assert greedy.usage.completion_tokens == 3 * single.usage.completion_tokens
    sampled = [
        client.completions.create(
            model="strata", prompt="Once upon a time", n=4, max_tokens=12, temperature=1.0, seed=7
        )
        for _ in range(2)
    ]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]
    assert len({c.text for c in sampled[0].choices}) > 1  # seed + i: different samples
    stream = client.chat.completions.create(
        model="strata",
        messages=[{"role": "user", "content": QUESTION}],
        n=2,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts: dict[int, str] = {0: "", 1: ""}
    usage = None
    for chunk in stream:
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
        usage = chunk.usage or usage
    assert parts[0] == parts[1] and parts[0]
    assert usage is not None and usage.completion_tokens == 2 * 8
    wait_idle(url)


def test_logit_bias_through_the_openai_client(url, client):
    zebra = httpx.post(
        f"{url}/tokenize", json={"text": " zebra", "add_special_tokens": False}, timeout=30
    ).json()["tokens"][0]
    bias = {str(zebra): 100}
    out = client.completions.create(
        model="strata",
        prompt="My favourite animal is the",
        max_tokens=3,
        temperature=0,
        logit_bias=bias,
    )
    assert out.choices[0].text == " zebra" * 3
    for bad in ({"not-a-token": 1}, {str(zebra): 500}, {"99999999": 1}):
        r = httpx.post(
            f"{url}/v1/completions", json={"prompt": "hi", "logit_bias": bad}, timeout=30
        )
        assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"], r.text


def test_completion_echo_streamed_and_not(client):
    prompt = "The capital of France is"
    plain = client.completions.create(model="strata", prompt=prompt, max_tokens=4, temperature=0)
    echoed = client.completions.create(
        model="strata", prompt=prompt, max_tokens=4, temperature=0, echo=True
    )
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="strata", prompt=prompt, max_tokens=4, temperature=0, echo=True, stream=True
        )
        if c.choices
    )
    assert streamed == echoed.choices[0].text


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 16}},
            "required": ["zone"],
        },
    },
}


def test_tool_calls_follow_the_tool_schema(url, client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = client.chat.completions.create(
        model="strata",
        messages=ask,
        tools=[WEATHER, TIME],
        max_tokens=64,
        temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
    )
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    required = client.chat.completions.create(
        model="strata",
        messages=ask,
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=64,
        temperature=0,
    )
    assert required.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")
    plain = client.chat.completions.create(
        model="strata",
        messages=ask,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=8,
        temperature=0,
    )
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls
    bad = [
        {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tool_choice": "required", "tools": []},
        {"tool_choice": "sometimes"},
    ]
    for extra in bad:
        r = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=30,
            json={"messages": ask, "tools": [WEATHER], **extra},
        )
        assert r.status_code == 400, r.text
    wait_idle(url)


def streamed_calls(stream) -> tuple[dict[int, dict], str, str | None]:
    """Tool calls put together from the stream's deltas (as OpenAI clients do), the
    content, and the finish reason."""
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": "", "parts": 0})
            call["id"] = call["id"] or d.id
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
            call["parts"] += bool(d.function.arguments)
        finish = choice.finish_reason or finish
    return calls, content, finish


def test_tool_calls_stream_and_run_in_parallel(url, client):
    ask = [{"role": "user", "content": "What is the weather in Paris and the time in Tokyo?"}]
    calls, content, finish = streamed_calls(
        client.chat.completions.create(
            model="strata",
            messages=ask,
            tools=[WEATHER, TIME],
            max_tokens=64,
            temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            stream=True,
        )
    )
    assert finish == "tool_calls" and content == "" and len(calls) == 1
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert isinstance(json.loads(calls[0]["arguments"])["city"], str)
    assert calls[0]["parts"] >= 3  # the arguments arrive as they are generated
    whole = client.chat.completions.create(
        model="strata",
        messages=ask,
        tools=[WEATHER, TIME],
        max_tokens=64,
        temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    got = whole.choices[0].message.tool_calls[0].function.arguments
    assert json.loads(calls[0]["arguments"]) == json.loads(got)
    both = client.chat.completions.create(
        model="strata",
        messages=ask,
        tools=[WEATHER, TIME],
        max_tokens=96,
        temperature=0,
        tool_choice="required",
        parallel_tool_calls=True,
    )
    choice = both.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) >= 1
    for call in choice.message.tool_calls:
        assert call.function.name in ("get_weather", "get_time")
        assert isinstance(json.loads(call.function.arguments), dict)
    assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)
    calls, _, finish = streamed_calls(
        client.chat.completions.create(
            model="strata",
            messages=ask,
            tools=[WEATHER, TIME],
            max_tokens=96,
            temperature=0,
            tool_choice="required",
            parallel_tool_calls=True,
            stream=True,
        )
    )
    assert finish == "tool_calls" and [c["name"] for c in calls.values()] == [
        c.function.name for c in choice.message.tool_calls
    ]  # same greedy calls, streamed
    # auto: a reply that is no call streams as content
    calls, content, finish = streamed_calls(
        client.chat.completions.create(
            model="strata",
            messages=[{"role": "user", "content": "Say hello in French."}],
            tools=[WEATHER],
            tool_choice="auto",
            max_tokens=8,
            temperature=0,
            stream=True,
        )
    )
    assert not calls and content and finish == "length"
    wait_idle(url)


def test_a_session_keeps_its_conversation_pinned_until_closed(url, client):
    """SGLang's session API on the server: each turn continues the session's tokens and
    answers what the whole prompt would; the newest prefix stays pinned (a flush leaves it)
    until the session closes; the OpenAI routes pin in a session too; bad sessions are 400."""
    sid = httpx.post(f"{url}/open_session", json={"timeout": 60}, timeout=30).json()
    greedy = {"max_new_tokens": 8, "temperature": 0}
    whole: list[int] = []
    for turn in ("The lighthouse keeper", " wrote in his log that", " the storm"):
        ids = httpx.post(f"{url}/tokenize", json={"text": turn}, timeout=30).json()["tokens"]
        body = {"input_ids": ids, "sampling_params": greedy, "session_params": {"id": sid}}
        out = httpx.post(f"{url}/generate", json=body, timeout=60).json()
        alone = {"input_ids": whole + ids, "sampling_params": greedy}
        assert (
            out["output_ids"]
            == httpx.post(f"{url}/generate", json=alone, timeout=60).json()["output_ids"]
        )
        assert out["meta_info"]["prompt_tokens"] == len(whole + ids)
        whole += ids + out["output_ids"]
        rid = out["meta_info"]["id"]
    httpx.post(f"{url}/flush_cache", timeout=30)
    sessions = health(url)["sessions"]
    assert sessions["open"] >= 1 and sessions["pinned_pages"] > 0
    assert health(url)["radix_cache_stats"]["locked_pages"] >= sessions["pinned_pages"]
    branch = {"input_ids": [11], "sampling_params": greedy}
    branch["session_params"] = {"id": sid, "rid": rid, "offset": -2}
    assert httpx.post(f"{url}/generate", json=branch, timeout=60).status_code == 200
    chat(client, "Hi", extra_body={"session_params": {"id": sid}})
    assert httpx.post(f"{url}/close_session", json={"session_id": sid}, timeout=30).json() == {
        "status": "ok"
    }
    assert health(url)["sessions"]["pinned_pages"] == 0
    for bad in (
        {"text": "x", "session_params": {"id": sid}},  # closed
        {"text": "x", "session_params": {"id": "nope"}},
        {"text": ["a", "b"], "session_params": {"id": sid}},  # a batch
    ):
        r = httpx.post(f"{url}/generate", json=bad, timeout=30)
        assert r.status_code == 400, r.text
    assert (
        httpx.post(f"{url}/close_session", json={"session_id": sid}, timeout=30).status_code == 400
    )
