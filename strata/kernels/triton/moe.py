"""A mixture of experts in two Triton kernels (CUDA; on CPU under TRITON_INTERPRET=1, for
tests), beside the grouped torch path of strata.model.layers.SparseMoE, its oracle.

The (token, expert) pairs are sorted by expert and each expert's run padded to whole blocks
of BM pairs, on the device and with no host sync (the grid is sized for the worst case:
ceil(pairs / BM) + experts blocks; blocks past the last run exit at once), so a step's
launches do not depend on the routing:
- `_up_kernel`, program (block of pairs, block of BN intermediate columns): the block's
  token rows times its expert's gate and up rows, silu(gate) * up, into h [padded pairs, I];
- `_down_kernel`, program (block of pairs, block of BN hidden columns): h times the expert's
  down rows, times each pair's routing weight, into y [padded pairs, hidden];
then y's rows are added into their tokens' rows (index_add_, padding into a spare row).
Weights are the experts stacked: w_up [E, 2 x I, H] (gate rows, then up rows: transformers'
`gate_up_proj`), w_down [E, H, I]; float32 / float16 / bfloat16, not quantized.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# NOTE: pairs a program takes, and the output / reduction widths; tl.dot needs 16 at least.
BLOCK_PAIRS = 16
BLOCK_N = 32
BLOCK_K = 32


@triton.jit
def _up_kernel(
    X, W, H, Rows, Experts,
    s_xt, s_we, s_wn, s_ht,
    hidden, inter,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0)
    e = tl.load(Experts + blk)
    if e >= 0:
        pair = blk * BM + tl.arange(0, BM)
        rows = tl.load(Rows + pair)
        rm = rows >= 0
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        nm = n < inter
        gate = tl.zeros([BM, BN], tl.float32)
        up = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, hidden, BK):
            k = k0 + tl.arange(0, BK)
            km = k < hidden
            x = tl.load(
                X + rows[:, None] * s_xt + k[None, :], mask=rm[:, None] & km[None, :], other=0.0
            )
            at = W + e * s_we + k[:, None] + n[None, :] * s_wn  # [BK, BN]: rows of W, transposed
            both = km[:, None] & nm[None, :]
            wg = tl.load(at, mask=both, other=0.0)
            wu = tl.load(at + inter * s_wn, mask=both, other=0.0)
            if IEEE:
                gate += tl.dot(x, wg, input_precision="ieee")
                up += tl.dot(x, wu, input_precision="ieee")
            else:
                gate += tl.dot(x, wg)
                up += tl.dot(x, wu)
        h = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(H + pair[:, None] * s_ht + n[None, :], h.to(H.dtype.element_ty), mask=nm[None, :])


@triton.jit
def _down_kernel(
    H, W, Y, Weights, Experts,
    s_ht, s_we, s_wn, s_yt,
    hidden, inter,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0)
    e = tl.load(Experts + blk)
    if e >= 0:
        pair = blk * BM + tl.arange(0, BM)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        nm = n < hidden
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, inter, BK):
            k = k0 + tl.arange(0, BK)
            km = k < inter
            h = tl.load(H + pair[:, None] * s_ht + k[None, :], mask=km[None, :], other=0.0)
            w = tl.load(
                W + e * s_we + k[:, None] + n[None, :] * s_wn,
                mask=km[:, None] & nm[None, :],
                other=0.0,
            )
            if IEEE:
                acc += tl.dot(h, w, input_precision="ieee")
            else:
                acc += tl.dot(h, w)
        acc = acc * tl.load(Weights + pair)[:, None]
        tl.store(
            Y + pair[:, None] * s_yt + n[None, :], acc.to(Y.dtype.element_ty), mask=nm[None, :]
        )


def sort_pairs(
    chosen: torch.Tensor, weights: torch.Tensor, experts: int, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """chosen, weights [T, k]: each token's experts and their weights. Returns (rows,
    pair_weights, block_expert): rows [blocks * block] the token of each padded pair slot
    (-1 for padding), pair_weights the same slots' weights (0 for padding), block_expert
    [blocks] each block's expert (-1 past the last run). No host sync."""
    t, k = chosen.shape
    dev = chosen.device
    blocks = -(-t * k // block) + experts  # the worst case: every run ends in a partial block
    flat = chosen.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts)
    padded = (counts + block - 1) // block * block
    start = torch.cumsum(counts, 0) - counts  # each run's first sorted pair
    pad_start = torch.cumsum(padded, 0) - padded  # its first padded slot
    sorted_expert = flat[order]
    dest = pad_start[sorted_expert] + torch.arange(t * k, device=dev) - start[sorted_expert]
    rows = torch.full((blocks * block,), -1, dtype=torch.int64, device=dev)
    rows[dest] = order // k
    pair_weights = torch.zeros(blocks * block, dtype=weights.dtype, device=dev)
    pair_weights[dest] = weights.flatten()[order]
    ends = torch.cumsum(padded, 0) // block  # each run's blocks end here
    block_expert = torch.searchsorted(ends, torch.arange(blocks, device=dev), right=True)
    block_expert = torch.where(block_expert < experts, block_expert, -1)
    return rows, pair_weights, block_expert


def fused_experts(
    x: torch.Tensor,
    chosen: torch.Tensor,
    weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """sum over each token's chosen experts of weight * down(silu(gate x) * up x): x [T, H],
    chosen / weights [T, k], w_up [E, 2 I, H], w_down [E, H, I]. Returns [T, H] in x's dtype."""
    t, hidden = x.shape
    experts, inter = w_up.shape[0], w_down.shape[2]
    assert w_up.stride(-1) == 1 and w_down.stride(-1) == 1 and x.stride(-1) == 1
    rows, pair_weights, block_expert = sort_pairs(chosen, weights.float(), experts, BLOCK_PAIRS)
    slots = rows.shape[0]
    h = torch.empty(slots, inter, dtype=x.dtype, device=x.device)
    y = torch.zeros(slots, hidden, dtype=torch.float32, device=x.device)  # unrun blocks: 0
    ieee = x.dtype == torch.float32
    grid = (block_expert.shape[0], triton.cdiv(inter, BLOCK_N))
    _up_kernel[grid](
        x, w_up, h, rows, block_expert,
        x.stride(0), w_up.stride(0), w_up.stride(1), h.stride(0),
        hidden, inter,
        BM=BLOCK_PAIRS, BN=BLOCK_N, BK=BLOCK_K, IEEE=ieee,
    )  # fmt: skip
    grid = (block_expert.shape[0], triton.cdiv(hidden, BLOCK_N))
    _down_kernel[grid](
        h, w_down, y, pair_weights, block_expert,
        h.stride(0), w_down.stride(0), w_down.stride(1), y.stride(0),
        hidden, inter,
        BM=BLOCK_PAIRS, BN=BLOCK_N, BK=BLOCK_K, IEEE=ieee,
    )  # fmt: skip
    out = torch.zeros(t + 1, hidden, dtype=torch.float32, device=x.device)
    out.index_add_(0, torch.where(rows >= 0, rows, t), y)  # padding lands in row t
    return out[:t].to(x.dtype)
