"""AttentionBackend: the seam between the model and paged-attention implementations."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from strata.attention import reference
from strata.batch import ForwardBatch
from strata.config import SparseConfig
from strata.kernels.cpu import attention as cpu_kernels
from strata.kv.pool import KVCache, LayerKV


class AttentionBackend(ABC):
    """Computes attention of a batch's queries over the paged KV of each sequence."""

    @abstractmethod
    def prepare(self, batch: ForwardBatch, kv: KVCache | None = None) -> Any:
        """Per-batch metadata, computed once per forward and shared by every layer (kv: the
        pool the forward runs on, for state read from it)."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: LayerKV,
        meta: Any,
    ) -> torch.Tensor:
        """Store k, v [T, kv_heads, D] in the layer's pages, return attention [T, heads, D]."""

    def reads_in_place(self, device: torch.device) -> bool:
        """Whether decode reads each sequence's pages where they lie (no gather)."""
        return False

    def sparsity(self, meta: Any) -> list[tuple[int, int]] | None:
        """After a forward with `meta`: per sequence of its batch, (pages skipped, pages
        considered) by sparse decode over every layer and KV head; None if none ran."""
        return None

    def selected(self, meta: Any) -> list[torch.Tensor | None] | None:
        """After a forward with `meta`: per sequence of its batch, uint8 [pages] marking the
        pages some sparse layer and KV head kept (None for a sequence that did not decode
        sparsely); None if sparse decode did not run."""
        return None


@dataclass
class _Extend:
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
    def of(extends: list[_Extend], device: torch.device) -> Prefills:
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
class _Sparse:
    """Sparse decode of one forward: which decode rows select pages, and what they skip."""

    active: torch.Tensor  # [Bd] bool: context of at least min_context tokens
    active_u8: torch.Tensor  # the same as uint8, for the C kernel
    pages: torch.Tensor  # [Bd] int64: each sequence's pages
    touched: torch.Tensor  # [Bd, W] uint8: page indices some sparse layer and KV head kept
    segments: reference.Segments | None = None  # the radix segments: the coarse level
    layers: int = 0  # decode layers run
    kept: list[torch.Tensor] = field(default_factory=list)  # per sparse layer: [Bd, kv_heads]


@dataclass
class TorchMeta:
    write_at: tuple[torch.Tensor, torch.Tensor]  # (page ids, offsets) of the new tokens
    num_tokens: int
    num_seqs: int
    decode_rows: torch.Tensor | None = None  # [Bd] token rows with a single query
    decode_pages: torch.Tensor | None = None  # [Bd, max_pages]
    decode_lens: torch.Tensor | None = None  # [Bd]
    extends: list[_Extend] = field(default_factory=list)
    # cascade decode: pages every decode sequence starts with, then each one's own pages
    shared_pages: torch.Tensor | None = None  # [P]
    suffix_table: torch.Tensor | None = None  # [Bd, S]
    suffix_mask: torch.Tensor | None = None  # [Bd, S * page_size] bool
    sparse: _Sparse | None = None
    batch_rows: list[int] = field(default_factory=list)  # batch index of each decode row
    prefills: Prefills | None = None  # for a kernel that reads the pages in place
    plan: cpu_kernels.DecodePlan | None = None  # a dense decode-only batch on the C kernels
    shared: int = 0  # pages every decode row starts with, read once (cpu_kernels.shared_pages)


class TorchAttention(AttentionBackend):
    """The CPU backend and the reference: with `kernels`, the C kernels read the pages in place
    where they apply (KV writes, decode, prefill); elsewhere it gathers each sequence's pages
    and runs torch SDPA (reference.py, the oracle)."""

    def __init__(
        self,
        scale: float,
        page_size: int,
        sparse: SparseConfig | None = None,
        cascade_min_pages: int = 2,
        kernels: bool = True,
    ) -> None:
        self.scale = scale
        self.page_size = page_size
        self.sparse = sparse if sparse is not None and sparse.enabled else None
        self.cascade_min_pages = cascade_min_pages
        self.kernels = kernels  # use the C kernels (cpu_kernels) where they are built
        # rid -> (its segments' pages and ends, their summaries): computed once per request
        self._summaries: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}

    def reads_in_place(self, device: torch.device) -> bool:
        return self.kernels and cpu_kernels.available(device)

    def prepare(self, batch: ForwardBatch, kv: KVCache | None = None) -> TorchMeta:
        ps, table = batch.page_size, batch.page_table
        write_at = reference.split_slots(batch.slot_mapping, ps)
        meta = TorchMeta(write_at, batch.input_ids.shape[0], len(batch.q_lens))
        summaries, self._summaries = self._summaries, {}  # _segments keeps this batch's
        starts = [0]
        for q in batch.q_lens:
            starts.append(starts[-1] + q)
        kv_lens = batch.kv_lens
        decode = batch.row_by_row
        if decode:
            dev = table.device
            q_lens, prefix_lens = batch.q_lens, batch.prefix_lens
            # one decode row per new token of those sequences, in token order
            seqs = [i for i in decode for _ in range(q_lens[i])]
            lens_list = [prefix_lens[i] + j + 1 for i in decode for j in range(q_lens[i])]
            longest = max(lens_list)
            max_pages = -(-longest // ps)
            every = len(seqs) == len(decode) == len(kv_lens)  # one row per sequence, in order
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
                meta.sparse = _Sparse(active, active.to(torch.uint8), -(-lens // ps), touched)
                meta.sparse.segments = self._segments(batch, seqs, kv, summaries)
            # NOTE: the CPU kernel reads every sequence's pages in place, so a shared prompt's
            # pages are read from cache, not gathered: cascade decode only pays without it.
            elif not self.reads_in_place(dev):
                self._plan_cascade(meta, lens, ps)
            elif self.kernels and kv is not None and len(decode) == len(batch.q_lens):
                # every layer writes and decodes in one C call, its arguments made once here
                meta.plan = cpu_kernels.decode_plan(kv.layers[0], write_at, meta.decode_pages, lens)
            elif self.kernels:  # decode rows beside prefills
                meta.shared = cpu_kernels.shared_pages(meta.decode_pages, lens, ps)
        by_row = set(decode)
        for i, q in enumerate(batch.q_lens):
            if i not in by_row:
                pages = table[i, : -(-kv_lens[i] // ps)]
                meta.extends.append(_Extend(starts[i], q, batch.prefix_lens[i], pages))
        if meta.extends and self.reads_in_place(table.device):
            meta.prefills = Prefills.of(meta.extends, table.device)
        return meta

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: LayerKV,
        meta: TorchMeta,
    ) -> torch.Tensor:
        if meta.plan is not None:
            out = cpu_kernels.write_decode(q, k, v, kv_layer, meta.plan, self.scale)
            if out is not None:
                return out
        self._write(kv_layer, meta.write_at, k, v)
        if meta.decode_rows is not None and not meta.extends:
            return self._decode(q, kv_layer, meta)
        out = self._prefill(q, k, v, kv_layer, meta)
        if meta.decode_rows is not None:
            out[meta.decode_rows] = self._decode(q[meta.decode_rows], kv_layer, meta)
        return out

    def _write(
        self,
        layer: LayerKV,
        where: tuple[torch.Tensor, torch.Tensor],
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        if not (self.kernels and cpu_kernels.write_kv(layer, where, k, v)):
            reference.write_kv(layer, where, k, v)

    def _prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerKV, meta: TorchMeta
    ) -> torch.Tensor:
        """Attention of every prefilling sequence's rows (the other rows are left unset)."""
        p = meta.prefills
        if self.kernels and p is not None:
            got = cpu_kernels.paged_prefill(
                q, layer, p.table, p.starts, p.q_lens, p.prefix_lens, self.scale
            )
            if got is not None:
                return got
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
            )
        return out

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
        width = max(len(r[0]) for r in rows if r is not None)
        some = next(r[1] for r in rows if r is not None)
        dev = some.device
        sums = torch.zeros(len(decode), width, *some.shape[1:], dtype=some.dtype, device=dev)
        ends_t = torch.zeros(len(decode), width, dtype=torch.int64, device=dev)
        counts = torch.zeros(len(decode), dtype=torch.int64, device=dev)
        for j, r in enumerate(rows):
            if r is not None:
                n = len(r[0])
                sums[j, :n] = r[1]
                ends_t[j, :n] = torch.tensor(r[0])
                counts[j] = n
        return reference.Segments(ends_t, counts, sums)

    def _plan_cascade(self, meta: TorchMeta, lens: torch.Tensor, ps: int) -> None:
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

    def _decode(self, q: torch.Tensor, layer: LayerKV, meta: TorchMeta) -> torch.Tensor:
        k_pages, v_pages = layer.k, layer.v
        sp, state = self.sparse, meta.sparse
        if state is not None and sp is not None:
            state.layers += 1
            if layer.layer_id >= sp.dense_layers:  # Quest: the first layers attend broadly
                return self._sparse_decode(q, layer, meta, state, sp)
        if meta.shared_pages is not None:
            assert meta.suffix_table is not None and meta.suffix_mask is not None
            return reference.paged_decode_cascade(
                q,
                k_pages,
                v_pages,
                meta.shared_pages,
                meta.suffix_table,
                meta.suffix_mask,
                self.scale,
            )
        return self._dense_decode(q, layer, meta)

    def _dense_decode(self, q: torch.Tensor, layer: LayerKV, meta: TorchMeta) -> torch.Tensor:
        k_pages, v_pages = layer.k, layer.v
        pages, lens = meta.decode_pages, meta.decode_lens
        assert pages is not None and lens is not None
        if self.kernels:
            out = cpu_kernels.paged_decode(
                q, k_pages, v_pages, pages, lens, self.scale, meta.shared
            )
            if out is not None:
                return out
        mask = torch.arange(pages.shape[1] * self.page_size, device=q.device) < lens[:, None]
        return reference.paged_decode(q, k_pages, v_pages, pages, mask, self.scale)

    def _sparse_decode(
        self, q: torch.Tensor, layer: LayerKV, meta: TorchMeta, state: _Sparse, sp: SparseConfig
    ) -> torch.Tensor:
        """Each KV head of each long sequence attends to the pages select_pages keeps."""
        assert meta.decode_pages is not None and meta.decode_lens is not None
        if self.kernels:
            fused = cpu_kernels.sparse_decode(
                q,
                layer,
                meta.decode_pages,
                meta.decode_lens,
                state.active_u8,
                self.scale,
                sp.min_score,
                sp.budget,
                sp.sink_pages,
                sp.window_pages,
                state.touched,
                state.segments,
            )
            if fused is not None:
                out, kept = fused
                state.kept.append(kept)
                return out
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
        return self._selected_decode(q, layer, table, lens)

    def _selected_decode(
        self, q: torch.Tensor, layer: LayerKV, table: torch.Tensor, lens: torch.Tensor
    ) -> torch.Tensor:
        return reference.paged_decode_selected(q, layer.k, layer.v, table, lens, self.scale)

    def sparsity(self, meta: TorchMeta) -> list[tuple[int, int]] | None:
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

    def selected(self, meta: TorchMeta) -> list[torch.Tensor | None] | None:
        state = meta.sparse
        if state is None or not state.kept:
            return None
        out: list[torch.Tensor | None] = [None] * meta.num_seqs
        for j, row in enumerate(meta.batch_rows):
            if bool(state.active[j]):
                out[row] = state.touched[j, : int(state.pages[j])]
        return out
