"""What sparse decode's page selection looks like over time and over page groups, on long
English text (the Python docs, as bench/sparse_quality.py), embedded model, defaults.

Two questions decide what a KV hierarchy under sparse attention can gain:
- Fetch on select: how many pages does *no* sparse layer and KV head keep for N steps in a
  row? Only those can leave L1 (a page's block holds every layer). Also per (page, layer)
  and per (page, layer, KV head), the granularities a finer layout would allow.
- Two-level selection: scoring a group of G consecutive pages by the Quest bound of its
  aggregated summary (min of the pages' mins, max of their maxes) skips scoring its pages
  exactly when even that bound is under the cutoff relative to a lower bound on the best
  page's (the sink and window pages' best). How many pages does that skip?

Usage: python bench/sparse_structure.py [--lengths 4096 7936] [--steps 64]
"""

from __future__ import annotations

import argparse
import json

import torch
from sparse_quality import PS, corpus_ids, prefill

from strata.batch import SequenceChunk
from strata.config import KVPoolConfig, ModelConfig, SparseConfig
from strata.engine.runner import ModelRunner
from strata.kernels.cpu import attention as cpu_kernels

GROUPS = (2, 4, 8, 16)
WINDOWS = (1, 4, 8, 16, 64)


def measure(runner: ModelRunner, ids: list[int], length: int, steps: int) -> dict:
    sp = runner.model.backend.sparse
    be = runner.model.backend
    prompt, cont = ids[:length], ids[length : length + steps]
    pages = prefill(runner, prompt)
    kept: list[set[tuple[int, int, int]]] = []  # per step: (page index, layer, KV head)
    pruned = dict.fromkeys(GROUPS, 0)
    scored = [0]
    inner = be.sparse_decode

    def spy(q, layer, meta, state, sparse):
        n = int(meta.decode_lens[0] + PS - 1) // PS
        table = meta.decode_pages[:, :n].contiguous()
        sel, _, count = cpu_kernels.select_pages(
            q,
            layer.kmin,
            layer.kmax,
            table,
            meta.decode_lens,
            state.active,
            PS,
            be.scale,
            sparse.min_score,
            sparse.budget,
            sparse.sink_pages,
            sparse.window_pages,
        )
        index = {p: i for i, p in enumerate(table[0].tolist())}
        for h in range(count.shape[1]):
            for p in sel[0, h, : count[0, h]].tolist():
                kept[-1].add((index[p], layer.layer_id, h))
        # group bounds against the forced pages' best (exact pruning)
        lo, hi = layer.kmin[table[0]].float(), layer.kmax[table[0]].float()  # [n, kvh, d]
        kvh = lo.shape[1]
        qg = q[0].float().view(kvh, -1, q.shape[-1])  # [kvh, g, d]
        u = torch.maximum(qg[None] * lo[:, :, None], qg[None] * hi[:, :, None]).sum(-1)
        forced = list(range(sparse.sink_pages)) + list(range(n - sparse.window_pages, n))
        best_lo = u[forced].amax(0)  # [kvh, g]
        middle = torch.ones(n, dtype=torch.bool)
        middle[forced] = False
        scored[0] += int(middle.sum()) * kvh
        for g in GROUPS:
            for s in range(0, n, g):
                glo, ghi = lo[s : s + g].amin(0), hi[s : s + g].amax(0)
                bound = torch.maximum(qg * glo[:, None], qg * ghi[:, None]).sum(-1)
                skip = (be.scale * (bound - best_lo)).amax(-1) < sparse.min_score
                pruned[g] += int(skip.sum()) * int(middle[s : s + g].sum())
        return inner(q, layer, meta, state, sparse)

    be.sparse_decode = spy
    n = len(prompt)
    for tok in cont:
        if runner.pages_for(n + 1) > len(pages):
            pages += runner.pool.alloc(1)
        kept.append(set())
        runner.forward([SequenceChunk([tok], n, pages)])
        n += 1
    be.sparse_decode = inner
    runner.pool.free(pages)
    npages = len(pages)
    layers = runner.spec.num_layers - sp.dense_layers
    heads = runner.spec.num_kv_heads
    out: dict = {"prompt_tokens": length, "pages": npages, "untouched": {}, "group_pruned": {}}
    for w in WINDOWS:
        if w > len(kept):
            break
        span = set().union(*kept[-w:])
        out["untouched"][w] = {
            "page": 1 - len({p for p, _, _ in span}) / npages,
            "page_layer": 1 - len({(p, ly) for p, ly, _ in span}) / (npages * layers),
            "page_layer_head": 1 - len(span) / (npages * layers * heads),
        }
    out["group_pruned"] = {g: pruned[g] / scored[0] for g in GROUPS}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 7936])
    ap.add_argument("--steps", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(2)
    runner = ModelRunner.from_config(
        ModelConfig(dtype="bfloat16", sparse=SparseConfig()),
        KVPoolConfig(num_pages=(max(a.lengths) + a.steps) // PS + 8, page_size=PS),
    )
    ids = corpus_ids(runner.tokenizer)
    rows = [measure(runner, ids, n, a.steps) for n in a.lengths]
    print(json.dumps(rows, indent=1))
    print(
        "\n| prompt | pages no layer/head kept for 1 / 4 / 16 / 64 steps | per (page, layer) "
        "for 16 steps | pages a group bound prunes, G = 2 / 4 / 8 / 16 |"
    )
    print("|---:|---|---:|---|")
    for r in rows:
        u = r["untouched"]
        whole = " / ".join(f"{u[w]['page']:.1%}" for w in (1, 4, 16, 64) if w in u)
        layer = f"{u[16]['page_layer']:.1%}" if 16 in u else "-"
        groups = " / ".join(f"{r['group_pruned'][g]:.1%}" for g in GROUPS)
        print(f"| {r['prompt_tokens']} | {whole} | {layer} | {groups} |")


if __name__ == "__main__":
    main()
