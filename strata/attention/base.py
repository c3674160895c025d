"""The contract between the model and an attention backend.

The model calls a backend three ways, and never looks inside what it gets back:
- `prepare(batch, kv)` once per forward: an `AttentionMeta`, the batch planned (which rows
  decode, which prefill over which pages, sparse decode's state), shared by every layer;
- `forward(q, k, v, layer, meta)` per layer: write k and v into the layer's pages, return the
  attention of q over each sequence's pages;
- after the forward, `sparsity(meta)` and `selected(meta)`: what sparse decode skipped and
  kept, for the usage figures and the KV tiers.
A CUDA graph (strata.engine.cuda_graph) replays decode steps over static buffers:
`graph_meta` builds their metadata, `graph_replays` says which steps may replay.

Writing a backend: subclass AttentionBackend in a module of its own and implement its five
ops (`write_kv`, `prefill`, `decode`, `decode_selected`; `reads_in_place` if your kernels read
the pages where they lie); override `sparse_decode` if you fuse page selection with decode,
`plan_decode` to attach a plan of your own to the metadata; `check_device` to refuse a
device it cannot run on. Then name it in one line of strata.config.ATTENTION_BACKENDS (the
registry: `--attention-backend NAME` imports it from there).
The batch planning, sparse decode's page selection and the sparsity counts come with the
base class. tests/core/test_attention_backends.py registers the smallest such backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from strata.attention import reference
from strata.attention.meta import AttentionMeta, Extend, Prefills, SparseState
from strata.batch import ForwardBatch
from strata.config import SparseConfig
from strata.kv.pool import KVCache, LayerKV

__all__ = ["AttentionBackend", "AttentionMeta", "Extend", "Prefills", "SparseState"]


class AttentionBackend(ABC):
    """Attention of a batch's queries over the paged KV of each sequence.

    scale: the softmax scale; page_size: tokens per page; sparse: sparse decode's settings
    (None: dense); softcap: the attention logits' tanh soft cap (Gemma 2; a backend takes it
    only where supports_softcap says so, and then decodes densely); windows: per layer, its
    sliding window in tokens (0: none; () for a model without). Where a window cuts (a
    sequence longer than it), that layer's prefills run the reference ops with the window
    masked (`prefill_window`), and its decode rows `decode_window` (each a backend's kernel
    where it has one)."""

    supports_softcap = False

    def __init__(
        self,
        scale: float,
        page_size: int,
        sparse: SparseConfig | None = None,
        cascade_min_pages: int = 2,
        softcap: float | None = None,
        windows: tuple[int, ...] = (),
    ) -> None:
        if softcap is not None and not self.supports_softcap:
            raise ValueError(f"{type(self).__name__} has no attention logit soft-capping")
        self.scale = scale
        self.page_size = page_size
        self.softcap = softcap
        self.windows = windows
        self.min_window = min((w for w in windows if w), default=0)
        dense = softcap is not None  # page selection and cascade decode bound plain logits
        self.sparse = sparse if sparse is not None and sparse.enabled and not dense else None
        self.cascade_min_pages = 1 << 62 if dense else cascade_min_pages
        # rid -> (its segments' pages and ends, their summaries): computed once per request
        self._summaries: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}

    @classmethod
    def check_device(cls, device: str) -> None:
        """Raise ValueError if the backend cannot run on `device` (before it is made)."""
        return None

    # ---- the ops a backend implements ----------------------------------------------------

    @abstractmethod
    def write_kv(
        self,
        layer: LayerKV,
        where: tuple[torch.Tensor, torch.Tensor],
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Store k, v [T, kv_heads, D] at (page ids, offsets), with the pages' key summaries."""

    @abstractmethod
    def prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerKV, meta: AttentionMeta
    ) -> torch.Tensor:
        """Attention of every prefilling sequence's rows (meta.extends; meta.prefills where the
        backend reads in place), their K and V already written; the other rows are left unset."""

    @abstractmethod
    def decode(self, q: torch.Tensor, layer: LayerKV, meta: AttentionMeta) -> torch.Tensor:
        """Dense attention of the decode rows q [Bd, heads, D] over meta.decode_pages."""

    @abstractmethod
    def decode_selected(
        self, q: torch.Tensor, layer: LayerKV, table: torch.Tensor, lens: torch.Tensor
    ) -> torch.Tensor:
        """Sparse decode's attention over the pages kept: table [Bd * kv_heads, W], lens."""

    def reads_in_place(self, device: torch.device) -> bool:
        """Whether decode reads each sequence's pages where they lie (no gather)."""
        return False

    def plan_decode(self, meta: AttentionMeta, kv: KVCache | None, decode_only: bool) -> None:
        """Attach the backend's own plan of a dense decode batch (meta.plan, meta.shared);
        decode_only: no prefill rows beside. By default there is none."""
        return None

    def fused_plan(self, meta: AttentionMeta) -> Any:
        """The plan a model's fused decode layers run from (None: run layer by layer)."""
        return None

    # ---- the batch plan and the per-layer path (shared by every backend) ----------------

    def prepare(self, batch: ForwardBatch, kv: KVCache | None = None) -> AttentionMeta:
        """Per-batch metadata, computed once per forward and shared by every layer (kv: the
        pool the forward runs on, for state read from it)."""
        ps, table = batch.page_size, batch.page_table
        write_at = reference.split_slots(batch.slot_mapping, ps)
        meta = AttentionMeta(write_at, batch.input_ids.shape[0], len(batch.q_lens))
        meta.longest = max(batch.kv_lens)
        summaries, self._summaries = self._summaries, {}  # _segments keeps this batch's
        starts = [0]
        for q in batch.q_lens:
            starts.append(starts[-1] + q)
        if batch.row_by_row:
            self._plan_decode_rows(batch, kv, meta, starts, summaries)
        by_row = set(batch.row_by_row)
        for i, q in enumerate(batch.q_lens):
            if i not in by_row:
                pages = table[i, : -(-batch.kv_lens[i] // ps)]
                meta.extends.append(Extend(starts[i], q, batch.prefix_lens[i], pages))
        if meta.extends and self.reads_in_place(table.device):
            meta.prefills = Prefills.of(meta.extends, table.device)
        return meta

    def _plan_decode_rows(
        self,
        batch: ForwardBatch,
        kv: KVCache | None,
        meta: AttentionMeta,
        starts: list[int],
        summaries: dict[str, tuple[tuple[int, ...], torch.Tensor]],
    ) -> None:
        """One decode row per new token of the row-by-row sequences, in token order."""
        ps, table, decode = batch.page_size, batch.page_table, batch.row_by_row
        dev = table.device
        q_lens, prefix_lens = batch.q_lens, batch.prefix_lens
        seqs = [i for i in decode for _ in range(q_lens[i])]
        lens_list = [prefix_lens[i] + j + 1 for i in decode for j in range(q_lens[i])]
        longest = max(lens_list)
        max_pages = -(-longest // ps)
        every = len(seqs) == len(decode) == len(batch.kv_lens)  # one row per sequence, in order
        rows = table if every else table[torch.tensor(seqs, device=dev)]
        meta.decode_pages = rows[:, :max_pages].to(torch.int64).contiguous()
        lens = torch.tensor(lens_list, device=dev)
        meta.decode_rows = torch.tensor(
            [starts[i] + j for i in decode for j in range(q_lens[i])], device=dev
        )
        meta.decode_lens = lens
        meta.batch_rows = seqs
        sp = self.sparse
        if sp is not None and longest >= sp.min_context:
            active = lens >= sp.min_context
            touched = torch.zeros(len(seqs), max_pages, dtype=torch.uint8, device=dev)
            meta.sparse = SparseState(active, active.to(torch.uint8), -(-lens // ps), touched)
            meta.sparse.segments = self._segments(batch, seqs, kv, summaries)
        elif self._window_cuts(meta):
            return  # windowed layers take the reference ops: no whole-model plan
        # NOTE: a backend that reads every sequence's pages in place reads a shared prompt's
        # pages from cache, not gathered: cascade decode only pays without it.
        elif not self.reads_in_place(dev):
            self._plan_cascade(meta, lens, ps)
        else:
            self.plan_decode(meta, kv, len(decode) == len(batch.q_lens))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: LayerKV,
        meta: AttentionMeta,
    ) -> torch.Tensor:
        """Store k, v [T, kv_heads, D] in the layer's pages, return attention [T, heads, D]."""
        self.write_kv(kv_layer, meta.write_at, k, v)
        window = self.windows[kv_layer.layer_id] if self.windows else 0
        if window and meta.longest > window:
            return self._windowed(q, k, v, kv_layer, meta, window)
        if meta.decode_rows is not None and not meta.extends:
            return self._decode_rows(q, kv_layer, meta)
        out = self.prefill(q, k, v, kv_layer, meta)
        if meta.decode_rows is not None:
            out[meta.decode_rows] = self._decode_rows(q[meta.decode_rows], kv_layer, meta)
        return out

    def _window_cuts(self, meta: AttentionMeta) -> bool:
        return bool(self.min_window) and meta.longest > self.min_window

    def _windowed(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: LayerKV,
        meta: AttentionMeta,
        window: int,
    ) -> torch.Tensor:
        """A sliding-window layer of a batch its window cuts: the prefills by
        prefill_window, the decode rows by decode_window."""
        out = (
            self.prefill_window(q, k, v, layer, meta, window)
            if meta.extends
            else q.new_empty(q.shape)
        )
        if meta.decode_rows is not None:
            out[meta.decode_rows] = self.decode_window(q[meta.decode_rows], layer, meta, window)
        return out

    def prefill_window(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: LayerKV,
        meta: AttentionMeta,
        window: int,
    ) -> torch.Tensor:
        """prefill, each query seeing its last `window` positions only; by default the
        reference ops."""
        return self.reference_prefill(q, k, v, layer, meta, window)

    def decode_window(
        self, q: torch.Tensor, layer: LayerKV, meta: AttentionMeta, window: int
    ) -> torch.Tensor:
        """Dense attention of the decode rows q [Bd, heads, D] over each sequence's last
        `window` keys, the pages before them unread; by default the reference ops over the
        pages the window reaches."""
        pages, mask = self._window_pages(meta, window)
        return reference.paged_decode(q, layer.k, layer.v, pages, mask, self.scale, self.softcap)

    def reference_prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: LayerKV,
        meta: AttentionMeta,
        window: int = 0,
    ) -> torch.Tensor:
        """Every prefilling sequence's rows in reference.paged_prefill, one sequence at a
        time (with this backend's scale and soft cap; window: its sliding window, 0 none)."""
        out = torch.empty_like(q)
        for e in meta.extends:
            rows = slice(e.start, e.start + e.q_len)
            out[rows] = reference.paged_prefill(
                q[rows],
                k[rows],
                v[rows],
                layer.k,
                layer.v,
                e.page_ids,
                e.prefix_len,
                self.scale,
                self.softcap,
                window,
            )
        return out

    def _window_pages(self, meta: AttentionMeta, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode rows' pages a window of `window` tokens reaches (the pages before it
        are not read) and the mask of its keys among them."""
        pages, lens, ps = meta.decode_pages, meta.decode_lens, self.page_size
        assert pages is not None and lens is not None
        first = (lens - window).clamp(min=0) // ps  # [Bd]: the window's first page
        span = torch.arange(-(-window // ps) + 1, device=pages.device)  # pages it may touch
        cols = first[:, None] + span[None, :]
        table = pages.gather(1, cols.clamp(max=pages.shape[1] - 1))  # past the end: masked
        pos = (cols * ps)[:, :, None] + torch.arange(ps, device=pages.device)
        pos = pos.flatten(1)
        return table, (pos < lens[:, None]) & (pos >= lens[:, None] - window)

    def _decode_rows(self, q: torch.Tensor, layer: LayerKV, meta: AttentionMeta) -> torch.Tensor:
        sp, state = self.sparse, meta.sparse
        if state is not None and sp is not None:
            state.layers += 1
            if layer.layer_id >= sp.dense_layers:  # Quest: the first layers attend broadly
                return self.sparse_decode(q, layer, meta, state, sp)
        if meta.shared_pages is not None:
            assert meta.suffix_table is not None and meta.suffix_mask is not None
            return reference.paged_decode_cascade(
                q,
                layer.k,
                layer.v,
                meta.shared_pages,
                meta.suffix_table,
                meta.suffix_mask,
                self.scale,
            )
        return self.decode(q, layer, meta)

    def sparse_decode(
        self,
        q: torch.Tensor,
        layer: LayerKV,
        meta: AttentionMeta,
        state: SparseState,
        sp: SparseConfig,
    ) -> torch.Tensor:
        """Each KV head of each long sequence attends to the pages select_pages keeps (the
        batched torch ops of reference.select_pages, then decode_selected)."""
        assert meta.decode_pages is not None and meta.decode_lens is not None
        table, lens, kept = reference.select_pages(
            q,
            layer.kmin,
            layer.kmax,
            meta.decode_pages,
            meta.decode_lens,
            state.active,
            self.page_size,
            self.scale,
            sp.min_score,
            sp.budget,
            sp.sink_pages,
            sp.window_pages,
            state.segments,
            layer.layer_id,
        )
        state.kept.append(kept)
        state.touched |= reference.kept_mask(meta.decode_pages, table, kept)
        return self.decode_selected(q, layer, table, lens)

    def _segments(
        self,
        batch: ForwardBatch,
        decode: list[int],
        kv: KVCache | None,
        summaries: dict[str, tuple[tuple[int, ...], torch.Tensor]],
    ) -> reference.Segments | None:
        """The radix segments of the decode rows (ForwardBatch.segments), with their
        summaries. A request's summaries are computed once and kept while its segments' pages
        stay the same and it keeps decoding (summaries: those of the last forward; the ones
        of this forward's requests are kept, the rest dropped)."""
        if kv is None or len(batch.segments) != len(batch.q_lens):
            return None
        ps, lens, keep = batch.page_size, batch.kv_lens, self._summaries
        rows: list[tuple[tuple[int, ...], torch.Tensor] | None] = []
        for i in decode:
            ends = tuple(e for e in batch.segments[i] if e <= lens[i] // ps)
            rid = batch.rids[i]
            if not ends or not rid:
                rows.append(None)
                continue
            pages = batch.page_table[i, : ends[-1]]
            key = (*ends, -1, *pages.tolist())
            hit = summaries.get(rid)
            if hit is None or hit[0] != key:
                hit = (key, reference.segment_summaries(kv.data, pages, ends))
            keep[rid] = hit
            rows.append((ends, hit[1]))
        if not keep:
            return None
        return _stack_segments(rows)

    def _plan_cascade(self, meta: AttentionMeta, lens: torch.Tensor, ps: int) -> None:
        """Use cascade decode when every decode sequence starts with the same pages (the
        radix cache makes shared prompts share page ids) covering at least min_pages."""
        table = meta.decode_pages
        assert table is not None
        if table.shape[0] < 2:
            return
        same = (table == table[:1]).all(0).long().cumprod(0).sum().item()
        # NOTE: every sequence keeps a non-empty suffix (its newest token is in its own page).
        shared = min(int(same), (int(lens.min().item()) - 1) // ps)
        if shared < self.cascade_min_pages:
            return
        meta.shared_pages = table[0, :shared]
        meta.suffix_table = table[:, shared:]
        pos = torch.arange(meta.suffix_table.shape[1] * ps, device=table.device) + shared * ps
        meta.suffix_mask = pos[None, :] < lens[:, None]

    # ---- after a forward -----------------------------------------------------------------

    def sparsity(self, meta: AttentionMeta) -> list[tuple[int, int]] | None:
        """After a forward with `meta`: per sequence of its batch, (pages skipped, pages
        considered) by sparse decode over every layer and KV head; None if none ran."""
        state, sp = meta.sparse, self.sparse
        if state is None or sp is None:
            return None
        out = [(0, 0)] * meta.num_seqs
        kv_heads = state.kept[0].shape[1] if state.kept else 0
        kept = torch.stack(state.kept).sum((0, 2)) if state.kept else torch.zeros_like(state.pages)
        # inactive sequences keep every page, so skip none
        skipped = state.pages * kv_heads * len(state.kept) - kept
        considered = state.pages * kv_heads * state.layers * state.active
        pairs = zip(meta.batch_rows, skipped.tolist(), considered.tolist())
        for row, skipped, considered in pairs:
            out[row] = (skipped, considered)
        return out

    def selected(self, meta: AttentionMeta) -> list[torch.Tensor | None] | None:
        """After a forward with `meta`: per sequence of its batch, uint8 [pages] marking the
        pages some sparse layer and KV head kept (None for a sequence that did not decode
        sparsely); None if sparse decode did not run."""
        state = meta.sparse
        if state is None or not state.kept:
            return None
        out: list[torch.Tensor | None] = [None] * meta.num_seqs
        for j, row in enumerate(meta.batch_rows):
            if bool(state.active[j]):
                out[row] = state.touched[j, : int(state.pages[j])]
        return out

    # ---- CUDA graphs ---------------------------------------------------------------------

    def graph_meta(
        self,
        write_at: tuple[torch.Tensor, torch.Tensor],
        rows: torch.Tensor,
        pages: torch.Tensor,
        lens: torch.Tensor,
    ) -> AttentionMeta:
        """The metadata of a dense decode step of len(rows) sequences over static buffers
        (one row each; pages [B, W], lens [B]): a capture records the kernels reading them,
        a replay reads what was copied in."""
        b = rows.shape[0]
        return AttentionMeta(
            write_at=write_at,
            num_tokens=b,
            num_seqs=b,
            decode_rows=rows,
            decode_pages=pages,
            decode_lens=lens,
            batch_rows=list(range(b)),
        )

    def graph_replays(self, longest: int) -> bool:
        """Whether a decode step whose longest context is `longest` may replay a graph (sparse
        decode picks its pages on the host, so it runs eagerly)."""
        if self.min_window and longest > self.min_window:
            return False  # a window cuts: those layers run the reference ops, eagerly
        return self.sparse is None or longest < self.sparse.min_context


def _stack_segments(
    rows: list[tuple[tuple[int, ...], torch.Tensor] | None],
) -> reference.Segments:
    """Per decode row (ends, summaries) or None, as the padded tensors select_pages takes."""
    width = max(len(r[0]) for r in rows if r is not None)
    some = next(r[1] for r in rows if r is not None)
    dev = some.device
    sums = torch.zeros(len(rows), width, *some.shape[1:], dtype=some.dtype, device=dev)
    ends_t = torch.zeros(len(rows), width, dtype=torch.int64, device=dev)
    counts = torch.zeros(len(rows), dtype=torch.int64, device=dev)
    for j, r in enumerate(rows):
        if r is not None:
            n = len(r[0])
            sums[j, :n] = r[1]
            ends_t[j, :n] = torch.tensor(r[0])
            counts[j] = n
    return reference.Segments(ends_t, counts, sums)
