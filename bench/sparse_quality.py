"""Sparse vs dense decode on long English text, embedded model, one process, one machine.

The text is the Python documentation that ships with Python (pydoc_data.topics). For each
prompt length (2k, 4k, 8k tokens): the prompt is prefilled once (prefill is always dense) and
its pages are shared by both runs; each run then decodes the next 256 tokens of the text
teacher-forced, in its own pages, with sparse attention off (--attention-sparsity-threshold
0) or at the defaults. Reported: top-1 agreement and mean KL(dense || sparse) of the
next-token distributions, the pages skipped, decode attention time per step (every layer,
selection included), KV bytes read, and decode tok/s at batch 1 and 4 (four sequences over
the same long prefix, each with its own continuation). Then a pass key hidden at five depths
of 2k and 4k prompts: the greedy answer with and without sparse attention.

Usage: python bench/sparse_quality.py [--lengths 2048 4096 7936] [--positions 256]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from strata.batch import SequenceChunk
from strata.config import KVPoolConfig, ModelConfig, SparseConfig
from strata.engine.runner import ModelRunner

PS = 16


def corpus_ids(tokenizer) -> list[int]:
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class Timed:
    """Wraps the attention backend: seconds spent in decode-only forwards' attention."""

    def __init__(self, backend) -> None:
        self.backend, self.seconds = backend, 0.0
        self.inner = backend.forward
        backend.forward = self

    def __call__(self, q, k, v, layer, meta):
        t = time.perf_counter()
        out = self.inner(q, k, v, layer, meta)
        if not meta.extends:
            self.seconds += time.perf_counter() - t
        return out


def prefill(runner: ModelRunner, ids: list[int]) -> list[int]:
    pages = runner.pool.alloc(runner.pages_for(len(ids)))
    for start in range(0, len(ids), 2048):
        runner.forward([SequenceChunk(ids[start : start + 2048], start, pages)])
    return pages


def decode(runner, shared, n, feeds, sparse, batch=1, greedy_steps=0):
    """From n prefilled tokens in `shared` pages: each of `batch` sequences is fed `feeds`
    (the first as an extend chunk if longer than one token), then one token at a time
    (teacher-forced: the given tokens; greedy: its own argmax for greedy_steps more).
    Returns (logits [steps, vocab] of sequence 0, seconds of the decode steps, skipped,
    considered, greedy tokens)."""
    backend = runner.model.backend
    backend.sparse = sparse
    total = n + sum(len(f) for f in feeds) + greedy_steps + 1
    own = [runner.pool.alloc(runner.pages_for(total) - len(shared)) for _ in range(batch)]
    tables = [shared + o for o in own]
    logits, skipped, considered, pos, seconds = [], 0, 0, n, 0.0
    greedy: list[int] = []
    steps: list[list[int] | None] = [*feeds, *[None] * greedy_steps]
    try:
        for i, feed in enumerate(steps):
            toks = feed if feed is not None else [greedy[-1]]
            chunks = [SequenceChunk(toks, pos, t) for t in tables]
            t0 = time.perf_counter()
            step = runner.run(chunks)
            out = step.logits
            if len(toks) == 1 and i > 0:
                seconds += time.perf_counter() - t0
            logits.append(out[0].float())
            if greedy_steps and i >= len(feeds) - 1:
                greedy.append(int(out[0].argmax()))
            for s, c in step.sparsity or []:
                skipped, considered = skipped + s, considered + c
            pos += len(toks)
    finally:
        for o in own:
            runner.pool.free(o)
        backend.sparse = None
    return torch.stack(logits), seconds, skipped, considered, greedy


def compare(dense: torch.Tensor, sparse: torch.Tensor) -> tuple[float, float]:
    agree = (dense.argmax(-1) == sparse.argmax(-1)).float().mean().item()
    lp, lq = torch.log_softmax(dense, -1), torch.log_softmax(sparse, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    return agree, kl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 7936])
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--passkey-lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--speed-steps", type=int, default=32)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cfg = SparseConfig()
    runner = ModelRunner.from_config(ModelConfig(sparse=cfg), KVPoolConfig(PS, num_pages=3000))
    backend = runner.model.backend
    timer = Timed(backend)
    ids = corpus_ids(runner.tokenizer)
    page_bytes = runner.kv.bytes_per_page
    layers = runner.spec.num_layers
    results: dict = {"config": cfg.__dict__, "teacher_forced": [], "passkey": []}
    print(f"corpus: {len(ids)} tokens; sparse defaults: {cfg}")
    for n in a.lengths:
        n -= n % PS
        start = (n * 7) % max(1, len(ids) - n - a.positions - 1)
        prompt = ids[start : start + n]
        feeds = [[t] for t in ids[start + n : start + n + a.positions]]
        shared = prefill(runner, prompt)
        try:
            row = {"tokens": n}
            for name, sp in (("dense", None), ("sparse", cfg)):
                timer.seconds = 0.0
                lg, _, skipped, considered, _ = decode(runner, shared, n, feeds, sp)
                row[name] = lg
                row[f"{name}_attention_ms"] = 1000 * timer.seconds / (len(feeds) - 1)
                if sp is not None:
                    row["sparsity"] = skipped / max(considered, 1)
            row["agreement"], row["kl"] = compare(row.pop("dense"), row.pop("sparse"))
            kv = n * page_bytes / PS  # every layer's K and V of the context
            row["dense_kv_mb"] = kv / 1e6
            summaries = kv / (PS + 1) * (layers - cfg.dense_layers) / layers  # sparse layers
            row["sparse_kv_mb"] = (kv * (1 - row["sparsity"]) + summaries) / 1e6
            for batch in (1, 4):
                for name, sp in (("dense", None), ("sparse", cfg)):
                    speed_feeds = feeds[: a.speed_steps]
                    _, secs, *_ = decode(runner, shared, n, speed_feeds, sp, batch=batch)
                    row[f"{name}_tok_s_b{batch}"] = batch * (len(speed_feeds) - 1) / secs
        finally:
            runner.pool.free(shared)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
        results["teacher_forced"].append(row)
    rng = random.Random(0)
    tok = runner.tokenizer
    for n in a.passkey_lengths:
        for depth in (0.1, 0.3, 0.5, 0.7, 0.9):
            key = str(rng.randint(10000, 99999))
            head = tok(
                "There is a pass key hidden in the text below. Find it and remember it.\n\n",
                add_special_tokens=False,
            )["input_ids"]
            needle = tok(
                f"\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n",
                add_special_tokens=False,
            )["input_ids"]
            ask = tok("\n\nWhat is the pass key? The pass key is", add_special_tokens=False)[
                "input_ids"
            ]
            filler = n - len(head) - len(needle) - len(ask)
            at = int(filler * depth)
            off = rng.randint(0, len(ids) - filler - 1)
            prompt = head + ids[off : off + at] + needle + ids[off + at : off + filler] + ask
            cut = (len(prompt) - 1) // PS * PS  # the rest (at least a token) is fed per run
            shared = prefill(runner, prompt[:cut])
            try:
                answers = {}
                for name, sp in (("dense", None), ("sparse", cfg)):
                    *_, greedy = decode(runner, shared, cut, [prompt[cut:]], sp, greedy_steps=8)
                    answers[name] = tok.decode(greedy)
            finally:
                runner.pool.free(shared)
            row = {
                "tokens": len(prompt),
                "depth": depth,
                "key": key,
                **answers,
                "dense_found": key in answers["dense"],
                "sparse_found": key in answers["sparse"],
            }
            print(json.dumps(row))
            results["passkey"].append(row)
    print(
        "\n| prompt | top-1 agreement | mean KL | pages skipped | attention ms/step dense | "
        "sparse | speed-up | KV read MB dense | sparse | tok/s b1 dense | sparse | b4 dense "
        "| sparse |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["teacher_forced"]:
        speedup = r["dense_attention_ms"] / r["sparse_attention_ms"]
        print(
            f"| {r['tokens']} | {100 * r['agreement']:.1f}% | {r['kl']:.4f} | "
            f"{100 * r['sparsity']:.1f}% | {r['dense_attention_ms']:.2f} | "
            f"{r['sparse_attention_ms']:.2f} | {speedup:.2f}x | {r['dense_kv_mb']:.0f} | "
            f"{r['sparse_kv_mb']:.0f} | {r['dense_tok_s_b1']:.1f} | {r['sparse_tok_s_b1']:.1f} "
            f"| {r['dense_tok_s_b4']:.1f} | {r['sparse_tok_s_b4']:.1f} |"
        )
    for n in a.passkey_lengths:
        rows = [r for r in results["passkey"] if abs(r["tokens"] - n) < PS]
        d, s = sum(r["dense_found"] for r in rows), sum(r["sparse_found"] for r in rows)
        both = all(r["sparse_found"] for r in rows if r["dense_found"])
        print(
            f"pass key at {n} tokens: dense found {d}/{len(rows)}, sparse {s}/{len(rows)}; "
            f"sparse finds every key dense finds: {both}"
        )
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
