"""Sparse vs dense decode through `strata serve`'s public API: long prompts, decode tok/s.

One run, one machine: the server is started dense (--attention-sparsity-threshold 0) and
with the defaults, bfloat16, the embedded model. For batch 1 and batch 4, that many streamed
/generate requests run at once, each with its own prompt of --tokens tokens of English text
(the Python docs, pydoc_data.topics) and 64 new tokens (ignore_eos). Decode tok/s counts the
tokens that arrive after every request has its first token, over the time until the last.

Usage: python bench/sparse_serve.py [--tokens 7936] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx

from launch.local import running_server
from strata.model.loader import load_tokenizer, resolve_checkpoint


def prompts(n: int, tokens: int) -> list[list[int]]:
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = load_tokenizer(resolve_checkpoint(None))(text, add_special_tokens=False)["input_ids"]
    step = (len(ids) - tokens) // n
    return [ids[i * step : i * step + tokens] for i in range(n)]


def stream(url: str, ids: list[int], new: int, times: list[float], meta: dict) -> None:
    body = {
        "input_ids": ids,
        "stream": True,
        "sampling_params": {"max_new_tokens": new, "temperature": 0, "ignore_eos": True},
    }
    seen = 0
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=1800) as r:
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            ev = json.loads(line[5:])
            now = time.perf_counter()
            got = len(ev["output_ids"])
            times.extend([now] * (got - seen))
            seen = got
            meta.update(ev["meta_info"])


def run(url: str, batch: list[list[int]], new: int) -> dict:
    times: list[list[float]] = [[] for _ in batch]
    metas: list[dict] = [{} for _ in batch]
    threads = [
        threading.Thread(target=stream, args=(url, p, new, t, m))
        for p, t, m in zip(batch, times, metas)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = max(t[0] for t in times)  # every request is decoding from here on
    end = max(t[-1] for t in times)
    after = sum(sum(1 for x in t if x > start) for t in times)
    gaps = [b - a for t in times for a, b in zip(t, t[1:]) if a >= start]
    return {
        "decode_tok_s": after / (end - start),
        "itl_p50": statistics.median(gaps),
        "sparsity": statistics.mean(m.get("attention_sparsity_ratio", 0) for m in metas),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=7936)
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()
    batch = prompts(4, a.tokens)
    pages = str(4 * (a.tokens + a.new_tokens) // 16 + 64)
    rows = []
    for name, flags in (("dense", ["--attention-sparsity-threshold", "0"]), ("sparse", [])):
        extra = ["--dtype", "auto", "--num-pages", pages, "--disable-radix-cache", *flags]
        with running_server(*extra, timeout=300) as url:
            for b in (1, 4):
                r = run(url, batch[:b], a.new_tokens)
                rows.append({"system": name, "batch": b, **r})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{a.tokens}-token prompts, {a.new_tokens} new tokens, strata serve, bfloat16")
    print(
        "| batch | dense tok/s | sparse tok/s | speed-up | dense ITL p50 | sparse ITL p50 | "
        "pages skipped |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b in (1, 4):
        d = next(r for r in rows if r["system"] == "dense" and r["batch"] == b)
        s = next(r for r in rows if r["system"] == "sparse" and r["batch"] == b)
        print(
            f"| {b} | {d['decode_tok_s']:.1f} | {s['decode_tok_s']:.1f} | "
            f"{s['decode_tok_s'] / d['decode_tok_s']:.2f}x | {1000 * d['itl_p50']:.1f} ms | "
            f"{1000 * s['itl_p50']:.1f} ms | {100 * s['sparsity']:.1f}% |"
        )


if __name__ == "__main__":
    main()
