"""The Triton kernels against the torch reference ops, run on CPU under TRITON_INTERPRET=1
(set by tests/conftest.py before anything imports triton). The interpreter has no bfloat16,
so the kernels are checked in float32 and float16 there.

On a GPU machine the same tests run compiled, bfloat16 too:
    STRATA_TEST_DEVICE=cuda TRITON_INTERPRET=0 python -m pytest tests/core/test_triton_attention.py
"""

from __future__ import annotations

import os

import pytest
import torch

from strata.attention import reference as ref
from strata.attention.cpu_backend import CpuAttention
from strata.attention.registry import make_backend
from strata.attention.torch_backend import TorchAttention
from strata.config import KVPoolConfig, ModelConfig, SparseConfig
from strata.engine.runner import ModelRunner
from strata.kv.pool import KVCache
from tests.core.test_sparse_attention import decode_logits

DEVICE = os.environ.get("STRATA_TEST_DEVICE", "cpu")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("the Triton interpreter is off", allow_module_level=True)
if DEVICE != "cpu" and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip(f"STRATA_TEST_DEVICE={DEVICE} but torch sees no GPU", allow_module_level=True)

from strata.kernels.triton import attention as tk  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# compiled, exp and the sums round a little differently from the interpreter's numpy
if DEVICE != "cpu":
    TOL[torch.float32] = 1e-4
LOW = [torch.float16, torch.bfloat16] if DEVICE != "cpu" else [torch.float16]


@pytest.fixture(autouse=True)
def on_device():
    """Tensors made without a device go to DEVICE (a no-op on CPU)."""
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device("cpu")


def pools(pages, page_size, kv_heads, dim, dtype, layers=2):
    """Two identical random pools (one per implementation); returns their layer 1."""
    torch.manual_seed(0)
    a = KVCache(layers, pages, page_size, kv_heads, dim, dtype, DEVICE)
    a.data.copy_(torch.randn(a.data.shape))
    b = KVCache(layers, pages, page_size, kv_heads, dim, dtype, DEVICE)
    b.data.copy_(a.data)
    return a, b


def tables(lens, pages, page_size, seed=0):
    """Disjoint random pages per sequence: (table [B, W] padded with page 0, rows)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(pages, generator=g, device="cpu").tolist()
    rows, at = [], 0
    for n in lens:
        k = max(1, -(-n // page_size))
        rows.append(perm[at : at + k])
        at += k
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], device=DEVICE), rows


def slots(rows, page_size, starts, counts):
    """(pages, offsets) of tokens starts[i] .. starts[i] + counts[i] of each sequence i, laid
    out one sequence after another as a forward batch lays them out."""
    pages, offsets = [], []
    for row, start, n in zip(rows, starts, counts):
        for j in range(start, start + n):
            pages.append(row[j // page_size])
            offsets.append(j % page_size)
    return torch.tensor(pages, device=DEVICE), torch.tensor(offsets, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_write_kv_equals_reference_with_summaries(dtype, page_size):
    """A prefill of ragged sequences, then chunks that start inside a partial page, then
    single-token decode steps: the pool, K, V and the page summaries, bit for bit."""
    kvh, d = 3, 24
    a, b = pools(96, page_size, kvh, d, dtype)
    _, rows = tables([40, 8, 40], 96, page_size)
    done = [0, 0, 0]
    torch.manual_seed(1)
    for counts in ([9, 1, 17], [5, 0, 6], [1, 1, 1], [1, 1, 1]):
        where = slots(rows, page_size, done, counts)
        k = torch.randn(len(where[0]), kvh, d, dtype=dtype)
        v = torch.randn(len(where[0]), kvh, d, dtype=dtype)
        ref.write_kv(a.layers[1], where, k, v)
        tk.write_kv(b.layers[1], where, k, v)
        done = [x + n for x, n in zip(done, counts)]
    assert torch.equal(a.data, b.data)


# GQA ratios 1, 3 and 8, pages of 1, 4 and 16 tokens, each in float32 and float16
F32, F16 = torch.float32, torch.float16
SHAPES = [
    (4, 4, 4, F32),
    (6, 2, 1, F32),
    (8, 1, 16, F32),
    (6, 2, 16, F16),
    (8, 1, 4, F16),
    (4, 4, 1, F16),
]
if DEVICE != "cpu":
    SHAPES += [(9, 3, 16, torch.bfloat16), (8, 1, 1, torch.bfloat16)]


@pytest.mark.parametrize("splits,block", [(None, None), (3, None), (None, 128)])
@pytest.mark.parametrize("heads,kv_heads,page_size,dtype", SHAPES)
def test_paged_decode_equals_reference(dtype, heads, kv_heads, page_size, splits, block):
    """Ragged lengths: one token, exactly a page, a page and one, several pages; in one
    program per sequence and KV head, with each sequence's keys in three parts (some empty
    for the short ones) combined by their log-sum-exp, and in blocks of 128 keys (the GPU
    default: one block spans many pages)."""
    d = 32
    a, b = pools(96, page_size, kv_heads, d, dtype)
    lens = [1, page_size, page_size + 1, 5 * page_size - 2, 37]
    table, _ = tables(lens, 96, page_size, seed=2)
    torch.manual_seed(3)
    q = torch.randn(len(lens), heads, d, dtype=dtype)
    mask = torch.arange(table.shape[1] * page_size)[None, :] < torch.tensor(lens)[:, None]
    want = ref.paged_decode(q, a.layers[1].k, a.layers[1].v, table, mask, d**-0.5)
    got = tk.paged_decode(q, b.layers[1], table, torch.tensor(lens), d**-0.5, splits, block)
    assert got.dtype == dtype
    assert (got.float() - want.float()).abs().max() <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
def test_selected_page_decode_equals_reference(dtype, heads, kv_heads):
    """Each KV head over the pages select_pages kept for it (a partial last page included)."""
    ps, d = 4, 32
    a, b = pools(96, ps, kv_heads, d, dtype)
    lens = [3, 30, 61, 44]
    table, _ = tables(lens, 96, ps, seed=4)
    torch.manual_seed(5)
    q = torch.randn(len(lens), heads, d, dtype=dtype)
    layer = a.layers[1]
    active = torch.tensor([False, True, True, True])
    sel, sel_lens, kept = ref.select_pages(
        q, layer.kmin, layer.kmax, table, torch.tensor(lens), active, ps, d**-0.5, -0.5, 0, 1, 2
    )
    assert (kept < -(-torch.tensor(lens)[:, None] // ps)).any()  # some pages were skipped
    want = ref.paged_decode_selected(q, layer.k, layer.v, sel, sel_lens, d**-0.5)
    got = tk.paged_decode_selected(q, b.layers[1], sel, sel_lens, d**-0.5)
    assert (got.float() - want.float()).abs().max() <= TOL[dtype]


@pytest.mark.parametrize("heads,kv_heads,page_size,dtype", SHAPES)
def test_prefill_over_cached_prefix_equals_reference(dtype, heads, kv_heads, page_size):
    """A ragged batch of prefills in one launch: no prefix, a prefix ending inside a page, a
    prefix of whole pages, a single new token, and more new tokens than one query block."""
    d = 32
    a, b = pools(160, page_size, kv_heads, d, dtype)
    prefix = [0, 2 * page_size + 1, 3 * page_size, 7, 0]
    q_lens = [5, 9, 1, 35, 1]
    lens = [p + n for p, n in zip(prefix, q_lens)]
    table, rows = tables(lens, 160, page_size, seed=6)
    torch.manual_seed(7)
    where = slots(rows, page_size, prefix, q_lens)
    t = sum(q_lens)
    q = torch.randn(t, heads, d, dtype=dtype)
    k = torch.randn(t, kv_heads, d, dtype=dtype)
    v = torch.randn(t, kv_heads, d, dtype=dtype)
    ref.write_kv(a.layers[1], where, k, v)
    tk.write_kv(b.layers[1], where, k, v)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0)[:-1].tolist()])
    got = tk.paged_prefill(
        q,
        b.layers[1],
        table,
        starts,
        torch.tensor(q_lens),
        torch.tensor(prefix),
        max(q_lens),
        d**-0.5,
    )
    layer = a.layers[1]
    for i in range(len(lens)):
        r = slice(int(starts[i]), int(starts[i]) + q_lens[i])
        pages = torch.tensor(rows[i])
        want = ref.paged_prefill(q[r], k[r], v[r], layer.k, layer.v, pages, prefix[i], d**-0.5)
        assert (got[r].float() - want.float()).abs().max() <= TOL[dtype], i


@pytest.mark.parametrize("cap,window", [(2.0, 0), (None, 7), (2.0, 9)])
def test_soft_cap_and_window_equal_reference(cap, window):
    """Gemma's soft cap and a sliding window, in decode (split in three parts, so some parts
    lie wholly before the window) and in prefill over a cached prefix; the pages wholly
    before every window hold NaN in the kernels' pool, so a read of one would show."""
    ps, d, heads, kv_heads, dtype = 4, 32, 6, 2, torch.float32
    a, b = pools(96, ps, kv_heads, d, dtype)
    lens = [3, 8, 30, 45]
    table, rows = tables(lens, 96, ps, seed=8)
    if window:
        for i, n in enumerate(lens):
            if n > window + 8:  # the prefill below reads from n - 8 - window + 1 on
                unread = torch.tensor(rows[i][: (n - 8 - window + 1) // ps])
                b.layers[1].k[unread] = float("nan")
                b.layers[1].v[unread] = float("nan")
    torch.manual_seed(9)
    q = 4 * torch.randn(len(lens), heads, d, dtype=dtype)  # large logits: the cap bites
    pos = torch.arange(table.shape[1] * ps)[None, :]
    n = torch.tensor(lens)[:, None]
    mask = (pos < n) & (pos >= n - window) if window else pos < n
    la, lb = a.layers[1], b.layers[1]
    want = ref.paged_decode(q, la.k, la.v, table, mask, d**-0.5, cap)
    got = tk.paged_decode(q, lb, table, torch.tensor(lens), d**-0.5, 3, None, cap, window)
    assert torch.isfinite(got).all() and (got - want).abs().max() <= TOL[dtype]
    # prefill: the last 8 tokens of each of the two long sequences over the rest, cached
    long = [2, 3]
    prefix = [lens[i] - 8 for i in long]
    qp = 4 * torch.randn(16, heads, d, dtype=dtype)
    kp, vp = torch.randn(16, kv_heads, d, dtype=dtype), torch.randn(16, kv_heads, d, dtype=dtype)
    where = slots([rows[i] for i in long], ps, prefix, [8, 8])
    ref.write_kv(la, where, kp, vp)
    tk.write_kv(lb, where, kp, vp)
    got = tk.paged_prefill(
        qp,
        lb,
        table[long],
        torch.tensor([0, 8]),
        torch.tensor([8, 8]),
        torch.tensor(prefix),
        8,
        d**-0.5,
        cap=cap,
        window=window,
    )
    for j, i in enumerate(long):
        r = slice(8 * j, 8 * j + 8)
        pages = torch.tensor(rows[i])
        want = ref.paged_prefill(
            qp[r], kp[r], vp[r], la.k, la.v, pages, prefix[j], d**-0.5, cap, window
        )
        assert torch.isfinite(got[r]).all() and (got[r] - want).abs().max() <= TOL[dtype], i


@pytest.fixture
def triton_runners(tiny_checkpoint):
    """Factory: a runner on one tiny four-layer GQA model with a given attention backend."""
    folder, _ = tiny_checkpoint("llama", num_hidden_layers=4, num_key_value_heads=2)

    def make(backend: str, sparse: SparseConfig | None = None) -> ModelRunner:
        sparse = sparse or SparseConfig(threshold=0)
        return ModelRunner.from_config(
            ModelConfig(
                str(folder),
                dtype="float32",
                sparse=sparse,
                attention_backend=backend,
                device=DEVICE,
            ),
            KVPoolConfig(page_size=4, num_pages=128),
        )

    return make


PROMPT = [(i * 37 + 11) % 300 for i in range(70)]


def test_triton_backend_decodes_as_the_reference(triton_runners):
    """The model on the Triton backend: the logits of a prefill and greedy decode steps
    equal the torch reference backend's, dense and sparse."""
    torch_runner, triton_runner = triton_runners("torch"), triton_runners("triton")
    assert type(torch_runner.model.backend) is TorchAttention
    assert type(triton_runner.model.backend).__name__ == "TritonAttention"
    want, _ = decode_logits(torch_runner, PROMPT, 5)
    got, _ = decode_logits(triton_runner, PROMPT, 5)
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    sparse = SparseConfig(threshold=0.3, min_context=32, budget=0.5, window_pages=2)
    want, skipped = decode_logits(triton_runners("torch", sparse), PROMPT, 5)
    got, same = decode_logits(triton_runners("triton", sparse), PROMPT, 5)
    assert skipped == same and any(s is not None and s[0][0] > 0 for s in same)
    assert torch.allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_triton_backend_runs_soft_caps_and_windows_as_the_reference(tiny_checkpoint, arch):
    """Gemma 2 (soft caps, a window on every other layer) and Gemma 3 (5 window layers to
    a global one) with windows shorter than the prompt: the Triton backend's prefill and
    decode logits equal the torch reference backend's."""
    from tests.core.test_model_exact import GEMMA3, GEMMA_CAPS

    caps = GEMMA_CAPS if arch == "gemma2" else {}
    more = {**GEMMA_CAPS, "sliding_window": 8} if arch == "gemma2" else GEMMA3
    folder, _ = tiny_checkpoint(arch, num_hidden_layers=6, head_dim=16, pad_token_id=0, **more)
    logits = []
    for backend in ("torch", "triton"):
        model = ModelConfig(str(folder), dtype="float32", attention_backend=backend, device=DEVICE)
        runner = ModelRunner.from_config(model, KVPoolConfig(page_size=4, num_pages=128))
        assert runner.model.backend.softcap == caps.get("attn_logit_softcapping")
        logits.append(decode_logits(runner, PROMPT[:30], 4)[0])
    assert torch.allclose(logits[1], logits[0], atol=1e-4, rtol=0)


def test_triton_backend_batches_prefill_and_decode_in_one_forward(triton_runners):
    """One forward with two prefills (one over a cached prefix) and a decode row."""
    from strata.batch import SequenceChunk

    outs = []
    for backend in ("torch", "triton"):
        runner = triton_runners(backend)
        a, b = runner.pool.alloc(8), runner.pool.alloc(8)
        c = runner.pool.alloc(4)
        runner.forward([SequenceChunk(PROMPT[:13], 0, a), SequenceChunk(PROMPT[:6], 0, b)])
        mixed = [
            SequenceChunk([5], 13, a),
            SequenceChunk(PROMPT[6:20], 6, b),
            SequenceChunk(PROMPT[30:39], 0, c),
        ]
        outs.append(runner.forward(mixed))
    assert torch.allclose(outs[1], outs[0], atol=1e-4, rtol=0)


def test_backend_choice(monkeypatch):
    assert type(make_backend("auto", "cpu", 0.1, 4)) is CpuAttention
    assert type(make_backend("cpu", "cpu", 0.1, 4)) is CpuAttention
    assert type(make_backend("torch", "cpu", 0.1, 4)) is TorchAttention
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="CUDA"):
        make_backend("triton", "cpu", 0.1, 4)
    with pytest.raises(ValueError, match="attention backend"):
        ModelConfig(attention_backend="flash")


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """The torch ops' result: bit-equal in 16-bit types under the interpreter (both round the
    same steps); compiled on a GPU, within two units in the last place at the result's scale
    (one H200 run found 14-15% of rotary outputs a unit off, from a product or sum rounded
    otherwise)."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want)
    elif DEVICE == "cpu":
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    else:
        atol = 2 * torch.finfo(got.dtype).eps * float(want.abs().max())
        torch.testing.assert_close(got, want, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_rope_in_place_equals_torch(dtype):
    """triton_ops.rope_ on the q and k heads viewed in a fused QKV row, in place."""
    from strata.kernels.triton import ops
    from strata.model.rope import RotaryEmbedding

    torch.manual_seed(8)
    t, heads, kv_heads, d = 5, 6, 2, 32
    rope = RotaryEmbedding(d, 64, 10000.0, {}, dtype, DEVICE)
    cos, sin = rope.tables(torch.tensor([0, 3, 17, 40, 63]))
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, dtype=dtype)
    qk = qkv[:, : (heads + kv_heads) * d].view(t, -1, d)
    v = qkv[:, (heads + kv_heads) * d :].clone()
    want = rope.apply(qk, cos, sin)
    ops.rope_(qk, cos, sin)
    close(qk, want)
    assert torch.equal(qkv[:, (heads + kv_heads) * d :], v)  # V untouched


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_add_rms_norm_and_silu_mul_equal_torch(dtype):
    """triton_ops.add_rms_norm (adding in place; Hugging Face's rounding: the normalized
    row rounded before the weight) and silu_mul, against torch's ops."""
    import torch.nn.functional as F

    from strata.kernels.triton import ops

    torch.manual_seed(9)
    x, delta = torch.randn(7, 96, dtype=dtype), torch.randn(7, 96, dtype=dtype)
    w = torch.randn(96, dtype=dtype)
    total = x + delta
    want = F.rms_norm(total.float(), (96,), eps=1e-5).to(dtype) * w
    got = ops.add_rms_norm(x, delta, w, 1e-5)
    torch.testing.assert_close(x, total, atol=0, rtol=0)  # added in place
    close(got, want)
    close(ops.add_rms_norm(x, None, w, 1e-5), want)
    gate_up = torch.randn(3, 2 * 80, dtype=dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    close(ops.silu_mul(gate_up), F.silu(gate) * up)
