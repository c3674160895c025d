"""Prometheus metrics of the REST front (one registry per app)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from strata.engine.request import RequestOutput

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_TIME_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
TOKEN_COUNT_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "strata_requests", "Requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "strata_request_latency_seconds",
            "End-to-end request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "strata_time_to_first_token_seconds",
            "Time to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # per request, under the names vLLM's and SGLang's dashboards use (strata_ prefix)
        self.e2e = Histogram(
            "strata_e2e_request_latency_seconds",
            "End-to-end latency of a finished request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "strata_time_per_output_token_seconds",
            "Mean time per output token after the first, per request",
            buckets=TOKEN_TIME_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "strata_request_queue_time_seconds",
            "Time a request waited for admission",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_hist = Histogram(
            "strata_request_prompt_tokens",
            "Prompt tokens per request",
            buckets=TOKEN_COUNT_BUCKETS,
            registry=r,
        )
        self.generation_hist = Histogram(
            "strata_request_generation_tokens",
            "Generated tokens per request",
            buckets=TOKEN_COUNT_BUCKETS,
            registry=r,
        )
        self._counters_and_gauges(r)

    def _counters_and_gauges(self, r: CollectorRegistry) -> None:
        self.prompt_tokens = Counter("strata_prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter("strata_generation_tokens", "Generated tokens", registry=r)
        self.cached_tokens = Counter(
            "strata_cached_prompt_tokens", "Prompt tokens served from the radix cache", registry=r
        )
        self.transfer_bytes = Counter(
            "strata_kv_transfer_bytes", "KV bytes sent from prefill to decode workers", registry=r
        )
        self.transfer_seconds = Histogram(
            "strata_kv_transfer_seconds",
            "Time of one request's KV transfer",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.sparsity = Histogram(
            "strata_attention_sparsity_ratio",
            "Per request: KV pages sparse decode skipped / "
            "pages it considered (0 for requests that decoded densely)",
            buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=r,
        )
        self.cache_hit_rate = Gauge("strata_cache_hit_rate", "Radix cache hit rate", registry=r)
        self.pages_used = Gauge("strata_kv_pages_used", "KV pages in use", registry=r)
        self.pages_total = Gauge("strata_kv_pages_total", "KV pages in the pool", registry=r)
        self.running = Gauge("strata_running_requests", "Requests running", registry=r)
        self.waiting = Gauge("strata_waiting_requests", "Requests waiting", registry=r)
        self.spec_accept_rate = Gauge(
            "strata_spec_accept_rate",
            "N-gram speculation: draft tokens the model kept / draft tokens verified",
            registry=r,
        )
        self.tiers = TierCollector()
        r.register(self.tiers)

    def observe_event(self, ev: RequestOutput) -> None:
        """Per streamed event: a prefill worker's KV transfer, on a request's first event."""
        if ev.transfer_bytes:
            self.transfer_bytes.inc(ev.transfer_bytes)
            self.transfer_seconds.observe(ev.transfer_seconds)

    def record(
        self, endpoint: str, last: RequestOutput, seconds: float, ttft: float | None
    ) -> None:
        """A finished request (any front): counts, latency and its per-request figures."""
        status = "error" if last.finish_reason == "error" else "ok"
        self.requests.labels(endpoint, status).inc()
        self.latency.labels(endpoint).observe(seconds)
        self.observe_finished(last, seconds, ttft)
        if last.usage is not None:
            self.prompt_tokens.inc(last.usage.prompt_tokens)
            self.generation_tokens.inc(last.usage.completion_tokens)
            self.cached_tokens.inc(last.usage.cached_tokens)
            self.sparsity.observe(last.usage.attention_sparsity_ratio)

    def observe_finished(self, out: RequestOutput, seconds: float, ttft: float | None) -> None:
        """Per finished request: its latency, time per output token, queue time, sizes."""
        self.e2e.observe(seconds)
        u = out.usage
        if u is None:
            return
        self.queue_time.observe(u.queue_seconds)
        self.prompt_hist.observe(u.prompt_tokens)
        self.generation_hist.observe(u.completion_tokens)
        if ttft is not None and u.completion_tokens > 1:
            self.tpot.observe((seconds - ttft) / (u.completion_tokens - 1))

    def observe_health(self, health: dict) -> None:
        self.tiers.health = health
        self.cache_hit_rate.set(health["radix_cache_stats"].get("hit_rate", 0.0))
        self.pages_total.set(health["pages_total"])
        self.pages_used.set(health["pages_total"] - health["pages_free"])
        self.running.set(health["running_requests"])
        self.waiting.set(health["waiting_requests"])
        spec = health.get("speculative") or {}
        if spec.get("draft_tokens"):
            self.spec_accept_rate.set(spec["accepted_tokens"] / spec["draft_tokens"])


class TierCollector(Collector):
    """Per KV tier, from the latest /health figures (the workers count, this reports):
    prompt tokens served from each tier, bytes moved between tiers, pages held."""

    def __init__(self) -> None:
        self.health: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        stats = self.health.get("radix_cache_stats") or {}
        if not stats.get("enabled"):
            return
        served = CounterMetricFamily(
            "strata_cache_served_tokens", "Prompt tokens served from each KV tier", labels=["tier"]
        )
        l1 = stats["cached_tokens"] - stats["l2_tokens"] - stats["l3_tokens"]
        for tier, tokens in (("l1", l1), ("l2", stats["l2_tokens"]), ("l3", stats["l3_tokens"])):
            if stats.get(f"{tier}_hit_rate") is not None:
                served.add_metric([tier], tokens)
        yield served
        tiers = stats.get("tiers")
        if not tiers:
            return
        moved = CounterMetricFamily(
            "strata_kv_tier_moved_bytes", "KV bytes moved between tiers", labels=["direction"]
        )
        for direction, nbytes in tiers["bytes_moved"].items():
            moved.add_metric([direction], nbytes)
        yield moved
        if "fetch_on_select" in tiers:
            fetch = CounterMetricFamily(
                "strata_kv_fetch_on_select_pages",
                "Pages of running requests moved to L2 unselected (demoted) and back (fetched)",
                labels=["kind"],
            )
            for kind, n in tiers["fetch_on_select"].items():
                fetch.add_metric([kind.removesuffix("_pages")], n)
            yield fetch
        pages = GaugeMetricFamily("strata_kv_tier_pages", "KV pages held per tier", labels=["tier"])
        pages.add_metric(["l1"], stats["cached_pages"])
        pages.add_metric(["l2"], stats["host_pages"])
        if tiers["l3"] is not None and tiers["l3"].get("pages") is not None:
            pages.add_metric(["l3"], tiers["l3"]["pages"])
        yield pages
