"""ForwardBatch: what one forward call computes (a mix of prefill chunks and decode tokens)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


def tail_rows(lengths: Sequence[int], tails: Sequence[int]) -> list[int]:
    """The indices of the last tails[i] rows of each run of lengths[i] rows, laid end to end
    (the rows of a batch's tokens that give logits)."""
    ends = itertools.accumulate(lengths)
    return [r for n, end in zip(tails, ends) for r in range(end - n, end)]


@dataclass(frozen=True)
class SequenceChunk:
    """New tokens of one sequence, to be computed on top of `prefix_len` tokens already in
    its pages. `pages` must cover prefix_len + len(token_ids) tokens."""

    token_ids: Sequence[int]
    prefix_len: int
    pages: Sequence[int]
    rid: str = ""  # the request's id, where a backend keeps state per sequence
    segments: tuple[int, ...] = ()  # page index where each radix segment of pages ends
    logit_rows: int = 1  # its last tokens that give logits (more where drafts are verified)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] the new tokens of every sequence, concatenated
    positions: torch.Tensor  # [T] absolute positions
    slot_mapping: torch.Tensor  # [T] KV slot (page * page_size + offset) of each new token
    page_table: torch.Tensor  # [B, max_pages] (padded with page 0)
    q_lens: list[int]
    prefix_lens: list[int]
    logits_index: torch.Tensor  # rows of the hidden states that produce logits
    page_size: int
    rids: list[str] = field(default_factory=list)
    segments: list[tuple[int, ...]] = field(default_factory=list)  # per sequence (SequenceChunk)
    logit_rows: list[int] = field(default_factory=list)  # per sequence (SequenceChunk)

    @property
    def kv_lens(self) -> list[int]:
        return [p + q for p, q in zip(self.prefix_lens, self.q_lens)]

    @property
    def row_by_row(self) -> list[int]:
        """The sequences whose every new token gives logits (a decode token, or a draft
        being verified): each of their rows attends as a decode row, over the keys up to
        its own, so a verified token sees what its plain decode step would have."""
        rows = self.logit_rows or [1] * len(self.q_lens)
        return [i for i, (q, n) in enumerate(zip(self.q_lens, rows)) if q == n]

    @classmethod
    def build(
        cls,
        chunks: Sequence[SequenceChunk],
        page_size: int,
        device: torch.device | str = "cpu",
        all_logits: bool = False,
    ) -> ForwardBatch:
        """Lay out chunks; logits for the last logit_rows tokens of each (every token if
        all_logits)."""
        assert chunks, "a batch needs at least one sequence"
        q_lens = [len(c.token_ids) for c in chunks]
        prefix_lens = [c.prefix_len for c in chunks]
        for c, q in zip(chunks, q_lens):
            assert 0 < c.logit_rows <= q, "every chunk computes its logit rows"
            assert len(c.pages) * page_size >= c.prefix_len + q, "pages do not cover the chunk"
        max_pages = max(len(c.pages) for c in chunks)
        table = [list(c.pages) + [0] * (max_pages - len(c.pages)) for c in chunks]
        positions: list[int] = []
        slots: list[int] = []
        for c, q in zip(chunks, q_lens):
            span = range(c.prefix_len, c.prefix_len + q)
            positions.extend(span)
            slots.extend(c.pages[p // page_size] * page_size + p % page_size for p in span)
        ids = [t for c in chunks for t in c.token_ids]
        if all_logits:
            rows = list(range(len(ids)))
        else:
            rows = tail_rows(q_lens, [c.logit_rows for c in chunks])
        # NOTE: from Python lists, one tensor each: a decode step's batch is a few ids, and
        # tensor ops (index, divide, cumsum) cost more than the lists (0.08 -> 0.03 ms).
        return cls(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            page_table=torch.tensor(table, dtype=torch.int64, device=device),
            q_lens=q_lens,
            prefix_lens=prefix_lens,
            logits_index=torch.tensor(rows, dtype=torch.int64, device=device),
            page_size=page_size,
            rids=[c.rid for c in chunks],
            segments=[c.segments for c in chunks],
            logit_rows=[c.logit_rows for c in chunks],
        )
