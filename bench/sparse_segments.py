"""Two-level page selection: what the radix segments spare, and what selection costs with
and without them, on long English text (the Python docs, as bench/sparse_quality.py),
embedded model, sparse defaults, one process.

The prompt is prefilled once; decode then runs teacher-forced with the prompt's pages cut
into radix segments of G pages (the engine's nodes are its prefill chunks: 512 tokens, 32
pages, by default; smaller G stands for the short turns of a multi-turn agent). At every
sparse layer of every step the C selection runs on the same query with and without the
segments (timed, best of 5), and the reference counts the pages whose scoring the segments
spare. The decode logits with and without segments are compared (they must be equal).

Usage: python bench/sparse_segments.py [--lengths 4096 7936] [--steps 32] [--groups 4 8 32]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from sparse_quality import PS, corpus_ids, prefill

from strata.attention import reference as ref
from strata.batch import SequenceChunk
from strata.config import KVPoolConfig, ModelConfig, SparseConfig
from strata.engine.runner import ModelRunner
from strata.kernels.cpu import attention as cpu_kernels


def best_of(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(runner: ModelRunner, ids: list[int], length: int, steps: int, group: int) -> dict:
    be = runner.model.backend
    prompt, cont = ids[:length], ids[length : length + steps]
    pages = prefill(runner, prompt)
    ends = tuple(range(group, length // PS, group)) + (length // PS,)
    stats = {"plain_s": 0.0, "two_level_s": 0.0, "spared": 0, "scored": 0}
    inner = be.sparse_decode

    def spy(q, layer, meta, state, sp):
        n = int(meta.decode_lens[0] + PS - 1) // PS
        table = meta.decode_pages[:, :n].contiguous()
        args = (
            q,
            layer.kmin,
            layer.kmax,
            table,
            meta.decode_lens,
            state.active,
            PS,
            be.scale,
            sp.min_score,
            sp.budget,
            sp.sink_pages,
            sp.window_pages,
        )
        segs = state.segments
        plain = cpu_kernels.select_pages(*args)
        two = cpu_kernels.select_pages(*args, segs, layer.layer_id)
        assert plain is not None and two is not None
        assert all(torch.equal(a, b) for a, b in zip(plain, two))
        stats["plain_s"] += best_of(lambda: cpu_kernels.select_pages(*args))
        stats["two_level_s"] += best_of(
            lambda: cpu_kernels.select_pages(*args, segs, layer.layer_id)
        )
        kvh, d = layer.kmin.shape[1:]
        lo, hi = layer.kmin[table[0]][None], layer.kmax[table[0]][None]
        qg = q.view(1, kvh, -1, d)
        u = ref.page_bounds(qg, lo, hi)
        pos = torch.arange(n)[None, :]
        forced = (pos < sp.sink_pages) | (pos >= n - sp.window_pages)
        stats["spared"] += int(
            ref.spared_pages(u, qg, forced, segs, layer.layer_id, be.scale, sp.min_score).sum()
        )
        stats["scored"] += int((~forced).sum()) * kvh
        return inner(q, layer, meta, state, sp)

    logits: dict[str, list[torch.Tensor]] = {"plain": [], "two_level": []}
    for name, rid, segs in (("plain", "", ()), ("two_level", "r", ends)):
        mine = list(pages)
        n = len(prompt)
        if name == "two_level":
            be.sparse_decode = spy
        for tok in cont:
            if runner.pages_for(n + 1) > len(mine):
                mine += runner.pool.alloc(1)
            out = runner.forward([SequenceChunk([tok], n, mine, rid, segs)])
            logits[name].append(out[0])
            n += 1
        be.sparse_decode = inner
        runner.pool.free(mine[len(pages) :])
    runner.pool.free(pages)
    same = all(torch.equal(a, b) for a, b in zip(logits["plain"], logits["two_level"]))
    return {
        "prompt_tokens": length,
        "group_pages": group,
        "segments": len(ends),
        "spared": stats["spared"] / max(stats["scored"], 1),
        "selection_ratio": stats["two_level_s"] / stats["plain_s"],
        "same_logits": same,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 7936])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--groups", type=int, nargs="+", default=[4, 8, 32])
    a = ap.parse_args()
    torch.set_num_threads(2)
    runner = ModelRunner.from_config(
        ModelConfig(dtype="bfloat16", sparse=SparseConfig()),
        KVPoolConfig(num_pages=(max(a.lengths) + 2 * a.steps) // PS + 16, page_size=PS),
    )
    ids = corpus_ids(runner.tokenizer)
    rows = [measure(runner, ids, n, a.steps, g) for n in a.lengths for g in a.groups]
    print(json.dumps(rows, indent=1))
    print(
        "\n| prompt | segment (pages) | pages spared scoring | selection time, two-level / "
        "page-level | same logits |"
    )
    print("|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['prompt_tokens']} | {r['group_pages']} | {r['spared']:.1%} | "
            f"{r['selection_ratio']:.2f}x | {r['same_logits']} |"
        )


if __name__ == "__main__":
    main()
