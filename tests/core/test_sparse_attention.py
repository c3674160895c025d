"""Sparse decode: page summaries, page selection and the selected-page kernel, each against
a brute-force computation of its definition, and the whole model against dense decode."""

from __future__ import annotations

import math

import pytest
import torch

from strata.attention import reference as ref
from strata.batch import SequenceChunk
from strata.config import HiCacheConfig, KVPoolConfig, ModelConfig, SparseConfig
from strata.engine.engine import Engine
from strata.engine.runner import ModelRunner
from strata.kernels.cpu import attention as cpu_kernels
from strata.kv.pool import KVCache
from strata.sampling.params import SamplingParams
from tests.core.test_scheduler import assert_pool_back_to_cache_only

PS = 4


def random_pool(pages, kv_heads, dim, dtype=torch.float32, layers=2):
    kv = KVCache(layers, pages, PS, kv_heads, dim, dtype, "cpu")
    kv.data.copy_(torch.randn(kv.data.shape))
    return kv


def page_tables(lens, pages, seed=0):
    """Disjoint random pages for sequences of the given lengths: (table [B, W], rows)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(pages, generator=g).tolist()
    rows, at = [], 0
    for n in lens:
        k = -(-n // PS)
        rows.append(perm[at : at + k])
        at += k
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows]), rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_stores_tokens_and_keeps_page_summaries(dtype):
    """A prefill chunk, then decode steps crossing page boundaries, into a pool whose pages
    held other keys before: each page's summary is the min / max of the keys written to it."""
    kvh, d = 3, 64
    outs = []
    for use_kernel in (True, False):
        torch.manual_seed(0)
        kv = random_pool(32, kvh, d, dtype)
        layer = kv.layers[1]
        table, rows = page_tables([24, 13], 32)
        written = {0: [], 1: []}  # sequence -> its keys in order
        torch.manual_seed(1)
        steps = [(0, 0, 13), (1, 0, 9), (0, 13, 7)] + [(s, 0, 1) for s in (0, 1)] * 4
        for seq, _, n in steps:
            start = len(written[seq])
            pos = torch.arange(start, start + n)
            pages = table[seq][pos // PS]
            k, v = torch.randn(n, kvh, d, dtype=dtype), torch.randn(n, kvh, d, dtype=dtype)
            where = (pages, pos % PS)
            if use_kernel:
                assert cpu_kernels.write_kv(layer, where, k, v)
            else:
                ref.write_kv(layer, where, k, v)
            written[seq] += list(zip(k, v))
        for seq, pages in enumerate(rows):
            keys = torch.stack([k for k, _ in written[seq]])
            vals = torch.stack([v for _, v in written[seq]])
            for i, p in enumerate(pages):
                kk, vv = keys[i * PS : (i + 1) * PS], vals[i * PS : (i + 1) * PS]
                assert torch.equal(layer.k[p, : len(kk)], kk)
                assert torch.equal(layer.v[p, : len(vv)], vv)
                assert torch.equal(layer.kmin[p], kk.amin(0))
                assert torch.equal(layer.kmax[p], kk.amax(0))
        outs.append(kv.data.clone())
    assert torch.equal(outs[0], outs[1])  # the kernel writes exactly what the reference does


def brute_force_selection(
    q, kmin, kmax, rows, lens, active, scale, min_score, budget, sink, window
):
    """select_pages' rule, one sequence, KV head and page at a time, in float64."""
    b, heads, d = q.shape
    kvh = kmin.shape[1]
    g = heads // kvh
    out = []
    for i in range(b):
        n = -(-lens[i] // PS)
        per_head = []
        for h in range(kvh):
            if not active[i] or n <= sink + window:
                per_head.append(list(range(n)))
                continue
            u = [
                [
                    sum(
                        max(
                            float(q[i, h * g + j, c]) * float(kmin[rows[i][p], h, c]),
                            float(q[i, h * g + j, c]) * float(kmax[rows[i][p], h, c]),
                        )
                        for c in range(d)
                    )
                    for j in range(g)
                ]
                for p in range(n)
            ]
            best = [max(u[p][j] for p in range(n)) for j in range(g)]
            score = [max(scale * (u[p][j] - best[j]) for j in range(g)) for p in range(n)]
            forced = [p for p in range(n) if p < sink or p >= n - window]
            cands = [p for p in range(n) if p not in forced and score[p] >= min_score]
            if budget:
                cap = math.ceil(budget * n) if budget < 1 else int(budget)
                cands = sorted(cands, key=lambda p: (-score[p], p))[: max(cap - len(forced), 0)]
            per_head.append(sorted(forced + cands))
        out.append(per_head)
    return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])  # GQA ratios 1, 3, 8
@pytest.mark.parametrize("min_score,budget", [(-1.2, 0), (-3.0, 0), (-1.2, 3), (-4.6, 0.4)])
def test_selection_equals_brute_force(heads, kv_heads, min_score, budget):
    """Ragged lengths at and around page boundaries, a one-page sequence, an inactive one."""
    torch.manual_seed(heads + kv_heads)
    d = 16
    lens = [37, 40, 41, 4, 1, 64, 25]
    active = [True, True, True, True, True, True, False]
    kv = random_pool(64, kv_heads, d)
    layer = kv.layers[0]
    lo, hi = torch.minimum(layer.kmin, layer.kmax), torch.maximum(layer.kmin, layer.kmax)
    spread = torch.rand(64, 1, 1) * 3  # pages of very different bounds, as in real text
    layer.kmin.copy_(lo * spread)  # a summary's min is at most its max
    layer.kmax.copy_(hi * spread)
    table, rows = page_tables(lens, 64, seed=heads)
    q = torch.randn(len(lens), heads, d)
    scale, sink, window = d**-0.5, 1, 2
    expect = brute_force_selection(
        q, layer.kmin, layer.kmax, rows, lens, active, scale, min_score, budget, sink, window
    )
    args = (
        q,
        layer.kmin,
        layer.kmax,
        table,
        torch.tensor(lens),
        torch.tensor(active),
        PS,
        scale,
        min_score,
        budget,
        sink,
        window,
    )
    segs = random_segments(kv, table, lens, seed=heads)
    skipped = 0
    picks = [cpu_kernels.select_pages(*args), ref.select_pages(*args)]
    # two levels: the radix segments rule out pages first, and nothing changes
    picks += [cpu_kernels.select_pages(*args, segs, 0), ref.select_pages(*args, segs, 0)]
    for picked in picks:
        assert picked is not None
        sel, sel_lens, kept = picked
        for i, n in enumerate(lens):
            for h in range(kv_heads):
                pages = [rows[i][p] for p in expect[i][h]]
                assert kept[i, h] == len(pages)
                assert sel[i, h, : len(pages)].tolist() == pages, (i, h)
                last = n - (-(-n // PS) - 1) * PS  # tokens in the sequence's last page
                assert sel_lens[i, h] == (len(pages) - 1) * PS + last
                skipped += -(-n // PS) - len(pages)
    assert skipped > 0  # the cases do skip pages
    # ... and at the tighter threshold the segments do spare some pages their scoring
    spared = spared_count(q, layer, table, lens, segs, scale, min_score, sink, window)
    assert min_score < -2 or spared > 0


def random_segments(kv, table, lens, seed):
    """Each sequence's whole pages cut into runs of 1 to 4 pages (one-page segments, runs
    over the sink and the window included), with their summaries from the pool."""
    g = torch.Generator().manual_seed(seed)
    all_ends = []
    for n in lens:
        ends, end = [], 0
        while end + 1 <= n // PS:
            end = min(end + int(torch.randint(1, 5, (1,), generator=g)), n // PS)
            ends.append(end)
        all_ends.append(ends)
    width = max(len(e) for e in all_ends)
    sums = torch.zeros(len(lens), width, *kv.data.shape[1:3], *kv.data.shape[4:])
    ends_t = torch.zeros(len(lens), width, dtype=torch.int64)
    for i, ends in enumerate(all_ends):
        if ends:
            sums[i, : len(ends)] = ref.segment_summaries(kv.data, table[i], ends)
            ends_t[i, : len(ends)] = torch.tensor(ends)
    counts = torch.tensor([len(e) for e in all_ends])
    return ref.Segments(ends_t, counts, sums.to(kv.data.dtype))


def spared_count(q, layer, table, lens, segs, scale, min_score, sink, window):
    """Pages (x KV heads) whose scoring the segments spare, by the reference."""
    b, heads, d = q.shape
    kvh = layer.kmin.shape[1]
    n = -(-torch.tensor(lens) // PS)
    w = table.shape[1]
    lo = layer.kmin.index_select(0, table.reshape(-1)).view(b, w, kvh, d)
    hi = layer.kmax.index_select(0, table.reshape(-1)).view(b, w, kvh, d)
    qg = q.view(b, kvh, heads // kvh, d)
    pos = torch.arange(w)[None, :]
    valid = pos < n[:, None]
    u = ref.page_bounds(qg, lo, hi).masked_fill(~valid[:, :, None, None], float("-inf"))
    forced = ((pos < sink) | (pos >= n[:, None] - window)) & valid
    spared = ref.spared_pages(u, qg, forced, segs, layer.layer_id, scale, min_score)
    return int(spared.sum())


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
def test_fused_sparse_decode_marks_the_pages_some_head_kept(heads, kv_heads):
    """The fused kernel's touched rows (fetch on select reads them) are the union over KV
    heads of what select_pages keeps, accumulated over calls (layers)."""
    torch.manual_seed(5)
    d = 16
    lens = [37, 64, 41, 5, 25]
    active = torch.tensor([True, True, True, True, False])
    kv = random_pool(64, kv_heads, d, layers=2)
    table, rows = page_tables(lens, 64, seed=1)
    seq_lens = torch.tensor(lens)
    touched = torch.zeros(table.shape, dtype=torch.uint8)
    want = torch.zeros_like(touched)
    for layer in kv.layers:
        q = torch.randn(len(lens), heads, d)
        args = (q, layer.kmin, layer.kmax, table, seq_lens, active, PS, d**-0.5, -1.2, 0.4, 1, 1)
        sel, _, kept = ref.select_pages(*args)
        want |= ref.kept_mask(table, sel, kept)
        got = cpu_kernels.sparse_decode(
            q, layer, table, seq_lens, active.to(torch.uint8), d**-0.5, -1.2, 0.4, 1, 1, touched
        )
        assert got is not None
    for i, n in enumerate(lens):
        pages = -(-n // PS)
        assert torch.equal(touched[i, :pages], want[i, :pages]), i
        assert touched[i, 0] == 1 and touched[i, pages - 1] == 1  # sink and window
        if not active[i] or pages <= 2:  # dense: every page
            assert touched[i, :pages].all()
    assert touched[0, :10].sum() < 10  # the budget (4 of 10 pages per head) skipped some


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
def test_selected_page_kernel_equals_reference_and_dense_attention(heads, kv_heads, dtype, tol):
    """Each KV head over its own pages: the kernel, the reference, and float64 attention over
    the same tokens (every page full but the last, which may be partial)."""
    torch.manual_seed(2)
    d, b = 64, 3
    kv = random_pool(80, kv_heads, d, dtype)
    layer = kv.layers[1]
    g = torch.Generator().manual_seed(3)
    width = 9
    table = torch.zeros(b, kv_heads, width, dtype=torch.int64)
    lens = torch.zeros(b, kv_heads, dtype=torch.int64)
    for i in range(b):
        for h in range(kv_heads):
            n = int(torch.randint(1, width + 1, (1,), generator=g))
            table[i, h, :n] = torch.randperm(80, generator=g)[:n]
            lens[i, h] = (n - 1) * PS + int(torch.randint(1, PS + 1, (1,), generator=g))
    q = torch.randn(b, heads, d, dtype=dtype)
    scale = d**-0.5
    out = cpu_kernels.paged_decode_selected(q, layer.k, layer.v, table, lens, scale)
    assert out is not None
    expect_ref = ref.paged_decode_selected(q, layer.k, layer.v, table, lens, scale)
    gs = heads // kv_heads
    for i in range(b):
        for h in range(kv_heads):
            n = int(lens[i, h])
            k = layer.k[table[i, h]].flatten(0, 1)[:n, h].double()
            v = layer.v[table[i, h]].flatten(0, 1)[:n, h].double()
            for j in range(h * gs, (h + 1) * gs):
                p = torch.softmax(k @ q[i, j].double() * scale, 0)
                want = p @ v
                assert (out[i, j].double() - want).abs().max() <= tol
                assert (expect_ref[i, j].double() - want).abs().max() <= tol


def test_sparse_config_refuses_bad_values():
    for bad in (
        {"threshold": 1.0},
        {"threshold": -0.1},
        {"budget": 2.5},
        {"budget": -1},
        {"window_pages": 0},
        {"demote_after": -1},
    ):
        with pytest.raises(ValueError):
            SparseConfig(**bad)


@pytest.fixture
def sparse_runners(tiny_checkpoint):
    """A dense runner and a factory of sparse runners on the same tiny four-layer model."""
    folder, _ = tiny_checkpoint("llama", num_hidden_layers=4, num_key_value_heads=2)

    def make(sparse: SparseConfig) -> ModelRunner:
        return ModelRunner.from_config(
            ModelConfig(str(folder), dtype="float32", sparse=sparse),
            KVPoolConfig(page_size=PS, num_pages=128),
        )

    return make(SparseConfig(threshold=0)), make


def decode_logits(runner, prompt, steps, rid="", segments=()):
    """Greedy decode of one prompt: the logits of each step, and the sparsity of each."""
    pages = runner.pool.alloc(runner.pages_for(len(prompt) + steps))
    chunk = SequenceChunk(list(prompt), 0, pages)
    out, sparsity = [], []
    for _ in range(steps):
        step = runner.run([chunk])
        out.append(step.logits[0])
        sparsity.append(step.sparsity)
        token = int(step.logits[0].argmax())
        at = chunk.prefix_len + len(chunk.token_ids)
        chunk = SequenceChunk([token], at, pages, rid, segments)
    runner.pool.free(pages)
    return torch.stack(out), sparsity


PROMPT = [(i * 37 + 11) % 300 for i in range(150)]


def test_sparse_decode_that_keeps_every_page_equals_dense(sparse_runners):
    """Selection runs (a tiny threshold and a budget above the page count keep everything):
    the per-head kernel gives the dense logits, and nothing is counted as skipped."""
    dense, make = sparse_runners
    keep_all = make(SparseConfig(threshold=1e-30, budget=1000, min_context=64, window_pages=2))
    want, none = decode_logits(dense, PROMPT, 8)
    got, sparsity = decode_logits(keep_all, PROMPT, 8)
    assert all(s is None for s in none)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    pages = [-(-(len(PROMPT) + i) // PS) for i in range(8)]  # context pages at each step
    # 4 layers x 2 KV heads considered, the first step is the prefill (no decode)
    assert [s[0] for s in sparsity[1:]] == [(0, p * 4 * 2) for p in pages[1:]]


def test_sparse_decode_skips_pages_and_counts_them(sparse_runners):
    _, make = sparse_runners
    sparse = make(SparseConfig(threshold=0.9, budget=0.5, min_context=64, window_pages=2))
    got, sparsity = decode_logits(sparse, PROMPT, 6)
    assert torch.isfinite(got).all()
    for (skipped, considered), i in zip((s[0] for s in sparsity[1:]), range(1, 6)):
        pages = -(-(len(PROMPT) + i) // PS)
        assert considered == pages * 4 * 2
        # layers 2 and 3 keep at most half the pages (the budget), sink and window included
        assert (pages - math.ceil(pages / 2)) * 2 * 2 <= skipped <= pages * 2 * 2


@pytest.mark.parametrize("attention", ["cpu", "torch"])
def test_radix_segments_change_no_logit(tiny_checkpoint, attention):
    """Two-level selection through the model: decode with the prompt's pages cut into radix
    segments (of 1 to 13 pages) gives exactly the logits of page-level selection, on the C
    kernel and on the torch reference; each request's segment summaries are computed once
    and dropped when it leaves the batch."""
    folder, _ = tiny_checkpoint("llama", num_hidden_layers=4, num_key_value_heads=2)
    runner = ModelRunner.from_config(
        ModelConfig(
            str(folder),
            dtype="float32",
            attention_backend=attention,
            sparse=SparseConfig(threshold=0.5, min_context=64, window_pages=2),
        ),
        KVPoolConfig(page_size=PS, num_pages=128),
    )
    want, sparsity = decode_logits(runner, PROMPT, 8)
    assert sum(s[0][0] for s in sparsity[1:]) > 0  # pages are skipped
    backend = runner.model.backend
    assert not backend._summaries
    ends = (1, 2, 15, 20, 33, 34, len(PROMPT) // PS)
    got, _ = decode_logits(runner, PROMPT, 8, "r1", ends)
    assert torch.equal(got, want)
    assert list(backend._summaries) == ["r1"]
    assert backend._summaries["r1"][1].shape[0] == len(ends)
    decode_logits(runner, PROMPT[:100], 2, "r2", (25,))
    assert list(backend._summaries) == ["r2"]


def test_short_sequences_stay_dense(sparse_runners):
    dense, make = sparse_runners
    sparse = make(SparseConfig(threshold=0.9, min_context=1024))
    want, _ = decode_logits(dense, PROMPT, 3)
    got, sparsity = decode_logits(sparse, PROMPT, 3)
    assert torch.equal(got, want) and all(s is None for s in sparsity)


def test_fetch_on_select_decodes_past_l1_to_the_same_tokens(tiny_checkpoint):
    """A request whose KV outgrows L1 (150 + 60 tokens = 53 pages, beside a short request,
    in an L1 of 48) decodes the tokens it decodes with a large L1: pages no sparse layer kept
    move to L2 instead of a request being preempted, are read there in place, and come back
    when selected once the short request's pages can be evicted; in the end every page is
    the cache's or free, and the cache holds as much of the long sequence as L1 can."""
    folder, _ = tiny_checkpoint("llama", num_hidden_layers=4, num_key_value_heads=1)
    sparse = SparseConfig(threshold=0.9, budget=0.3, min_context=64, window_pages=2, demote_after=1)
    long = SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True)
    short = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    other = [(i * 13 + 5) % 300 for i in range(28)]

    def run(num_pages: int, tiers: HiCacheConfig | None) -> tuple[Engine, list[list[int]]]:
        model = ModelConfig(str(folder), dtype="float32", sparse=sparse)
        runner = ModelRunner.from_config(model, KVPoolConfig(page_size=PS, num_pages=num_pages))
        engine = Engine(runner, tiers=tiers, max_batch_tokens=256)
        events: list[list] = [[], []]
        engine.submit(PROMPT, long, events[0].append)
        engine.submit(other, short, events[1].append)
        engine.run_until_done()
        assert [e[-1].finish_reason for e in events] == ["length", "length"]
        return engine, [[t for e in ev for t in e.token_ids] for ev in events]

    big, want = run(128, None)
    assert big.scheduler.offload is None
    engine, got = run(48, HiCacheConfig(enabled=True, ratio=2.0))
    assert got == want
    offload = engine.scheduler.offload
    assert offload is not None and offload.demoted > 0 and offload.fetched > 0
    assert engine.scheduler.preemptions == 0
    assert engine.stats().tiers["fetch_on_select"] == offload.stats()
    assert_pool_back_to_cache_only(engine)
    cache = engine.prefix_cache
    assert cache.host_pool.num_free + cache.tree.host_pages == cache.host_pool.num_pages
    assert cache.match(PROMPT + got[0]).length == 48 * PS


def test_a_request_decodes_over_the_radix_segments_of_its_pages(tiny_checkpoint):
    """A second turn's page table is the first turn's radix nodes (its prompt, then its
    reply), then its own prompt: those are the segments its sparse decode scores first."""
    folder, _ = tiny_checkpoint("llama", num_hidden_layers=4, num_key_value_heads=2)
    runner = ModelRunner.from_config(
        ModelConfig(
            str(folder),
            dtype="float32",
            sparse=SparseConfig(threshold=0.5, min_context=32, window_pages=2),
        ),
        KVPoolConfig(page_size=PS, num_pages=128),
    )
    engine = Engine(runner)
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    seen: list[tuple[int, ...]] = []

    def sink(out):
        req = engine._requests.get(out.rid)
        if req is not None:
            seen.append(req.segment_ends)

    first = PROMPT[:41]
    done: list = []
    engine.submit(first, params, done.append)
    engine.run_until_done()
    reply = [t for e in done for t in e.token_ids]
    second = first + reply + [7] * 9
    engine.submit(second, params, sink)
    engine.run_until_done()
    ends = seen[-1]
    assert ends[-1] == len(second) // PS and list(ends) == sorted(set(ends))
    # the first turn's prompt and reply are nodes of their own (the reply's last token has
    # no KV, so the cached part ends at the last whole page before it)
    assert len(first) // PS in ends and (len(first) + len(reply) - 1) // PS in ends
    engine.submit(PROMPT[:5], params, done.append)  # a short (dense) request runs next
    engine.run_until_done()
    assert runner.model.backend._summaries == {}  # the second turn's were dropped
    assert_pool_back_to_cache_only(engine)
