"""CpuAttention: strata's C kernels (strata.kernels.cpu) reading the pages in place, at the
CPU's ISA level; where no kernel applies (none built, a shape it does not take) each op is
the reference's."""

from __future__ import annotations

import torch

from strata.attention.base import AttentionMeta, SparseState
from strata.attention.torch_backend import TorchAttention
from strata.config import SparseConfig
from strata.kernels.cpu import attention as cpu_kernels
from strata.kv.pool import KVCache, LayerKV


class CpuAttention(TorchAttention):
    supports_softcap = True

    def reads_in_place(self, device: torch.device) -> bool:
        return cpu_kernels.available(device)

    def plan_decode(self, meta: AttentionMeta, kv: KVCache | None, decode_only: bool) -> None:
        assert meta.decode_pages is not None and meta.decode_lens is not None
        if kv is not None and decode_only and self.softcap is None:
            # every layer writes and decodes in one C call, its arguments made once here
            meta.plan = cpu_kernels.decode_plan(
                kv.layers[0], meta.write_at, meta.decode_pages, meta.decode_lens
            )
        else:  # decode rows beside prefills
            meta.shared = cpu_kernels.shared_pages(
                meta.decode_pages, meta.decode_lens, self.page_size
            )

    def fused_plan(self, meta: AttentionMeta) -> cpu_kernels.DecodePlan | None:
        return meta.plan

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: LayerKV,
        meta: AttentionMeta,
    ) -> torch.Tensor:
        if meta.plan is not None:
            out = cpu_kernels.write_decode(q, k, v, kv_layer, meta.plan, self.scale)
            if out is not None:
                return out
        return super().forward(q, k, v, kv_layer, meta)

    def write_kv(
        self,
        layer: LayerKV,
        where: tuple[torch.Tensor, torch.Tensor],
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        if not cpu_kernels.write_kv(layer, where, k, v):
            super().write_kv(layer, where, k, v)

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: LayerKV,
        meta: AttentionMeta,
    ) -> torch.Tensor:
        return self.prefill_window(q, k, v, layer, meta, 0)

    def prefill_window(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: LayerKV,
        meta: AttentionMeta,
        window: int,
    ) -> torch.Tensor:
        p = meta.prefills
        if p is not None:
            got = cpu_kernels.paged_prefill(
                q,
                layer,
                p.table,
                p.starts,
                p.q_lens,
                p.prefix_lens,
                self.scale,
                self.softcap,
                window,
            )
            if got is not None:
                return got
        if window:
            return super().prefill_window(q, k, v, layer, meta, window)
        return super().prefill(q, k, v, layer, meta)

    def decode(self, q: torch.Tensor, layer: LayerKV, meta: AttentionMeta) -> torch.Tensor:
        pages, lens = meta.decode_pages, meta.decode_lens
        assert pages is not None and lens is not None
        out = cpu_kernels.paged_decode(
            q, layer.k, layer.v, pages, lens, self.scale, meta.shared, self.softcap
        )
        return out if out is not None else super().decode(q, layer, meta)

    def decode_window(
        self, q: torch.Tensor, layer: LayerKV, meta: AttentionMeta, window: int
    ) -> torch.Tensor:
        pages, lens = meta.decode_pages, meta.decode_lens
        assert pages is not None and lens is not None
        out = cpu_kernels.paged_decode(
            q, layer.k, layer.v, pages, lens, self.scale, 0, self.softcap, window
        )
        return out if out is not None else super().decode_window(q, layer, meta, window)

    def sparse_decode(
        self,
        q: torch.Tensor,
        layer: LayerKV,
        meta: AttentionMeta,
        state: SparseState,
        sp: SparseConfig,
    ) -> torch.Tensor:
        """Page selection and decode over the pages kept in one C call per layer."""
        assert meta.decode_pages is not None and meta.decode_lens is not None
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
        if fused is None:
            return super().sparse_decode(q, layer, meta, state, sp)
        out, kept = fused
        state.kept.append(kept)
        return out
