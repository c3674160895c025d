"""Benchmark figures: throughput, latency percentiles, cache reuse vs a perfect cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from strata.bench.client import RequestRecord
from strata.cache.keys import common_prefix_len
from strata.tokenizer import chat_prompt_ids


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def perfect_reusable_tokens(records: Sequence[RequestRecord], tokenizer: Any) -> int:
    """Prompt tokens a perfect (token-exact, never-evicting) cache could have served: for each
    request, its longest common prefix with an earlier request's prompt + reply tokens."""
    seen: list[list[int]] = []
    total = 0
    for rec in records:
        prompt = chat_prompt_ids(tokenizer, rec.messages)
        best = max((common_prefix_len(prompt, prev) for prev in seen), default=0)
        total += min(best, len(prompt) - 1)  # the last prompt token is always computed
        seen.append(prompt + list(tokenizer.encode(rec.reply, add_special_tokens=False)))
    return total


def summarize(
    name: str, records: Sequence[RequestRecord], wall: float, tokenizer: Any | None = None
) -> dict[str, Any]:
    ok = [r for r in records if r.error is None]
    if tokenizer is not None:  # a server that reports no usage (llama-cpp-python when
        for r in ok:  # streaming): its replies' tokens, counted with the model's tokenizer
            if not r.completion_tokens and r.reply:
                r.completion_tokens = len(tokenizer.encode(r.reply, add_special_tokens=False))
    out_tokens = sum(r.completion_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    itl = [x for r in ok for x in r.itl]
    result: dict[str, Any] = {
        "system": name,
        "requests": len(records),
        "errors": len(records) - len(ok),
        "wall_s": wall,
        "output_tokens_per_s": out_tokens / wall if wall else 0.0,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "ttft_p50_s": percentile([r.ttft for r in ok], 50),
        "ttft_p99_s": percentile([r.ttft for r in ok], 99),
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "cached_tokens": cached,
        "cache_hit_rate": cached / prompt_tokens if prompt_tokens else 0.0,
    }
    if tokenizer is not None:
        perfect = perfect_reusable_tokens(ok, tokenizer)
        result["perfect_cache_tokens"] = perfect
        result["hit_vs_perfect"] = cached / perfect if perfect else 0.0
    return result


COLUMNS = [
    ("system", "{}", 34),
    ("output_tokens_per_s", "{:.1f}", 10),
    ("requests_per_s", "{:.2f}", 8),
    ("ttft_p50_s", "{:.3f}", 9),
    ("ttft_p99_s", "{:.3f}", 9),
    ("itl_p50_s", "{:.3f}", 9),
    ("itl_p99_s", "{:.3f}", 9),
    ("cache_hit_rate", "{:.3f}", 9),
    ("hit_vs_perfect", "{:.3f}", 9),
]
HEADERS = [
    "system",
    "out tok/s",
    "req/s",
    "TTFT p50",
    "TTFT p99",
    "ITL p50",
    "ITL p99",
    "hit rate",
    "vs perfect",
]


def table(results: Sequence[dict[str, Any]]) -> str:
    lines = [
        "".join(
            f"{h:>{w}}" if i else f"{h:<{w}}"
            for i, (h, (_, _, w)) in enumerate(zip(HEADERS, COLUMNS))
        )
    ]
    for r in results:
        cells = []
        for i, (key, fmt, width) in enumerate(COLUMNS):
            value = r.get(key)
            text = "-" if value is None else fmt.format(value)
            cells.append(f"{text:<{width}}" if i == 0 else f"{text:>{width}}")
        lines.append("".join(cells))
    return "\n".join(lines)
