"""TorchAttention: the reference backend. Each sequence's pages gathered and torch SDPA
(reference.py, the oracle the other backends are tested against); cascade decode where every
decode row starts with the same pages."""

from __future__ import annotations

import torch

from strata.attention import reference
from strata.attention.base import AttentionBackend, AttentionMeta
from strata.kv.pool import LayerKV


class TorchAttention(AttentionBackend):
    supports_softcap = True

    def write_kv(
        self,
        layer: LayerKV,
        where: tuple[torch.Tensor, torch.Tensor],
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        reference.write_kv(layer, where, k, v)

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: LayerKV,
        meta: AttentionMeta,
    ) -> torch.Tensor:
        return self.reference_prefill(q, k, v, layer, meta)

    def decode(self, q: torch.Tensor, layer: LayerKV, meta: AttentionMeta) -> torch.Tensor:
        pages, lens = meta.decode_pages, meta.decode_lens
        assert pages is not None and lens is not None
        mask = torch.arange(pages.shape[1] * self.page_size, device=q.device) < lens[:, None]
        return reference.paged_decode(q, layer.k, layer.v, pages, mask, self.scale, self.softcap)

    def decode_selected(
        self, q: torch.Tensor, layer: LayerKV, table: torch.Tensor, lens: torch.Tensor
    ) -> torch.Tensor:
        return reference.paged_decode_selected(q, layer.k, layer.v, table, lens, self.scale)
