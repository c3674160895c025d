"""AttentionBackend: the seam between the model and paged-attention implementations."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from strata.attention import reference
from strata.model.batch import ForwardBatch


class AttentionBackend(ABC):
    """Computes attention of a batch's queries over the paged KV of each sequence."""

    @abstractmethod
    def prepare(self, batch: ForwardBatch) -> Any:
        """Per-batch metadata, computed once per forward and shared by every layer."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: tuple[torch.Tensor, torch.Tensor],
        meta: Any,
    ) -> torch.Tensor:
        """Store k, v [T, kv_heads, D] in the layer's pages, return attention [T, heads, D]."""


@dataclass
class _Extend:
    start: int
    q_len: int
    prefix_len: int
    kv_index: torch.Tensor  # [prefix_len + q_len] slots


@dataclass
class TorchMeta:
    slot_mapping: torch.Tensor
    num_tokens: int
    decode_rows: torch.Tensor | None = None  # [Bd] token rows with a single query
    decode_index: torch.Tensor | None = None  # [Bd, max_kv]
    decode_mask: torch.Tensor | None = None  # [Bd, max_kv]
    extends: list[_Extend] = field(default_factory=list)


class TorchAttention(AttentionBackend):
    """The reference backend: gathers each sequence's pages and runs torch SDPA."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def prepare(self, batch: ForwardBatch) -> TorchMeta:
        ps, table = batch.page_size, batch.page_table
        meta = TorchMeta(slot_mapping=batch.slot_mapping, num_tokens=batch.input_ids.shape[0])
        starts = [0]
        for q in batch.q_lens:
            starts.append(starts[-1] + q)
        kv_lens = batch.kv_lens
        decode = [i for i, q in enumerate(batch.q_lens) if q == 1]
        if decode:
            max_kv = max(kv_lens[i] for i in decode)
            j = torch.arange(max_kv, device=table.device)
            sel = torch.tensor(decode, device=table.device)
            meta.decode_index = table[sel][:, j // ps] * ps + j % ps
            lens = torch.tensor([kv_lens[i] for i in decode], device=table.device)
            meta.decode_mask = j[None, :] < lens[:, None]
            meta.decode_rows = torch.tensor([starts[i] for i in decode], device=table.device)
        for i, q in enumerate(batch.q_lens):
            if q > 1:
                j = torch.arange(kv_lens[i], device=table.device)
                index = table[i, j // ps] * ps + j % ps
                meta.extends.append(_Extend(starts[i], q, batch.prefix_lens[i], index))
        return meta

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: tuple[torch.Tensor, torch.Tensor],
        meta: TorchMeta,
    ) -> torch.Tensor:
        k_slots, v_slots = kv_layer
        reference.write_kv(k_slots, v_slots, meta.slot_mapping, k, v)
        if meta.decode_rows is not None and not meta.extends:
            assert meta.decode_index is not None and meta.decode_mask is not None
            return reference.paged_decode(
                q, k_slots, v_slots, meta.decode_index, meta.decode_mask, self.scale
            )
        out = torch.empty_like(q)
        if meta.decode_rows is not None:
            assert meta.decode_index is not None and meta.decode_mask is not None
            dec = reference.paged_decode(
                q[meta.decode_rows], k_slots, v_slots, meta.decode_index, meta.decode_mask,
                self.scale,
            )  # fmt: skip
            out[meta.decode_rows] = dec
        for e in meta.extends:
            rows = slice(e.start, e.start + e.q_len)
            out[rows] = reference.paged_prefill(
                q[rows], k_slots, v_slots, e.kv_index, e.prefix_len, self.scale
            )
        return out


ATTENTION_BACKENDS: dict[str, Callable[[float], AttentionBackend]] = {"torch": TorchAttention}
