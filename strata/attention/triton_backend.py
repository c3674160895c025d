"""TritonAttention: KV write with page summaries, prefill over cached prefixes, and decode
(dense or over selected pages) in Triton kernels that read the pool in place (CUDA; on CPU
under TRITON_INTERPRET=1, for tests); page selection for sparse decode stays the batched torch
ops of reference.select_pages (the base class's)."""

from __future__ import annotations

import os

import torch

from strata.attention.base import AttentionBackend, AttentionMeta
from strata.kernels.triton import attention as triton_kernels
from strata.kv.pool import LayerKV


class TritonAttention(AttentionBackend):
    supports_softcap = True

    @classmethod
    def check_device(cls, device: str) -> None:
        if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "--attention-backend triton needs a CUDA device (on CPU it runs only "
                "under TRITON_INTERPRET=1, slowly: for tests)"
            )

    def reads_in_place(self, device: torch.device) -> bool:
        return True

    def write_kv(
        self,
        layer: LayerKV,
        where: tuple[torch.Tensor, torch.Tensor],
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        triton_kernels.write_kv(layer, where, k, v)

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: LayerKV,
        meta: AttentionMeta,
    ) -> torch.Tensor:
        p = meta.prefills
        assert p is not None, "prepare plans the prefills of a backend that reads in place"
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
        assert p is not None, "prepare plans the prefills of a backend that reads in place"
        return triton_kernels.paged_prefill(
            q,
            layer,
            p.table,
            p.starts,
            p.q_lens,
            p.prefix_lens,
            p.max_q_len,
            self.scale,
            cap=self.softcap,
            window=window,
        )

    def decode(self, q: torch.Tensor, layer: LayerKV, meta: AttentionMeta) -> torch.Tensor:
        return self.decode_window(q, layer, meta, 0)

    def decode_window(
        self, q: torch.Tensor, layer: LayerKV, meta: AttentionMeta, window: int
    ) -> torch.Tensor:
        assert meta.decode_pages is not None and meta.decode_lens is not None
        return triton_kernels.paged_decode(
            q,
            layer,
            meta.decode_pages,
            meta.decode_lens,
            self.scale,
            cap=self.softcap,
            window=window,
        )

    def decode_selected(
        self, q: torch.Tensor, layer: LayerKV, table: torch.Tensor, lens: torch.Tensor
    ) -> torch.Tensor:
        return triton_kernels.paged_decode_selected(q, layer, table, lens, self.scale)
