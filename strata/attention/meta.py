"""The metadata of one forward's attention (AttentionBackend.prepare makes it; the model
passes it through): which rows decode and which prefill over which pages, sparse decode's
state, and what a backend planned for the batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from strata.attention import reference


@dataclass
class Extend:
    """One prefilling sequence: its query rows from `start`, over prefix_len cached tokens."""

    start: int
    q_len: int
    prefix_len: int
    page_ids: torch.Tensor  # the pages covering prefix_len + q_len tokens


@dataclass
class Prefills:
    """Every prefilling sequence of one forward, as the prefill kernels take them (made once
    per forward where a kernel reads the pages in place)."""

    table: torch.Tensor  # [E, max_pages] int64
    starts: torch.Tensor  # [E] first token row
    q_lens: torch.Tensor  # [E]
    prefix_lens: torch.Tensor  # [E]
    max_q_len: int

    @staticmethod
    def of(extends: list[Extend], device: torch.device) -> Prefills:
        width = max(e.page_ids.shape[0] for e in extends)
        table = torch.zeros(len(extends), width, dtype=torch.int64, device=device)
        for i, e in enumerate(extends):
            table[i, : e.page_ids.shape[0]] = e.page_ids
        return Prefills(
            table,
            torch.tensor([e.start for e in extends], device=device),
            torch.tensor([e.q_len for e in extends], device=device),
            torch.tensor([e.prefix_len for e in extends], device=device),
            max(e.q_len for e in extends),
        )


@dataclass
class SparseState:
    """Sparse decode of one forward: which decode rows select pages, and what they skip."""

    active: torch.Tensor  # [Bd] bool: context of at least min_context tokens
    active_u8: torch.Tensor  # the same as uint8, for the C kernel
    pages: torch.Tensor  # [Bd] int64: each sequence's pages
    touched: torch.Tensor  # [Bd, W] uint8: page indices some sparse layer and KV head kept
    segments: reference.Segments | None = None  # the radix segments: the coarse level
    layers: int = 0  # decode layers run
    kept: list[torch.Tensor] = field(default_factory=list)  # per sparse layer: [Bd, kv_heads]


@dataclass
class AttentionMeta:
    """One forward's batch as every layer's attention takes it (AttentionBackend.prepare)."""

    write_at: tuple[torch.Tensor, torch.Tensor]  # (page ids, offsets) of the new tokens
    num_tokens: int
    num_seqs: int
    decode_rows: torch.Tensor | None = None  # [Bd] token rows with a single query
    decode_pages: torch.Tensor | None = None  # [Bd, max_pages]
    decode_lens: torch.Tensor | None = None  # [Bd]
    extends: list[Extend] = field(default_factory=list)
    # cascade decode: pages every decode sequence starts with, then each one's own pages
    shared_pages: torch.Tensor | None = None  # [P]
    suffix_table: torch.Tensor | None = None  # [Bd, S]
    suffix_mask: torch.Tensor | None = None  # [Bd, S * page_size] bool
    sparse: SparseState | None = None
    batch_rows: list[int] = field(default_factory=list)  # batch index of each decode row
    prefills: Prefills | None = None  # for a kernel that reads the pages in place
    plan: Any = None  # the backend's own plan of the batch (plan_decode), if any
    shared: int = 0  # pages every decode row starts with, read once (a kernel's choice)
    longest: int = 0  # the longest sequence's tokens (its KV after this forward)
