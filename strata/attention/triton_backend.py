"""TritonAttention: the torch backend's batch plan, with its four ops as Triton kernels."""

from __future__ import annotations

import torch

from strata.attention.backend import TorchAttention, TorchMeta
from strata.config import SparseConfig
from strata.kernels.triton import attention as triton_kernels
from strata.kv.pool import LayerKV


class TritonAttention(TorchAttention):
    """KV write with page summaries, prefill over cached prefixes, and decode (dense or over
    selected pages) in Triton kernels that read the pool in place; page selection for sparse
    decode stays the batched torch ops of reference.select_pages."""

    def __init__(self, scale: float, page_size: int, sparse: SparseConfig | None = None) -> None:
        super().__init__(scale, page_size, sparse, kernels=False)

    def reads_in_place(self, device: torch.device) -> bool:
        return True

    def _write(
        self,
        layer: LayerKV,
        where: tuple[torch.Tensor, torch.Tensor],
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        triton_kernels.write_kv(layer, where, k, v)

    def _prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerKV, meta: TorchMeta
    ) -> torch.Tensor:
        p = meta.prefills
        assert p is not None, "prepare plans the prefills of a backend that reads in place"
        return triton_kernels.paged_prefill(
            q, layer, p.table, p.starts, p.q_lens, p.prefix_lens, p.max_q_len, self.scale
        )

    def _dense_decode(self, q: torch.Tensor, layer: LayerKV, meta: TorchMeta) -> torch.Tensor:
        assert meta.decode_pages is not None and meta.decode_lens is not None
        return triton_kernels.paged_decode(
            q, layer, meta.decode_pages, meta.decode_lens, self.scale
        )

    def _selected_decode(
        self, q: torch.Tensor, layer: LayerKV, table: torch.Tensor, lens: torch.Tensor
    ) -> torch.Tensor:
        return triton_kernels.paged_decode_selected(q, layer, table, lens, self.scale)
