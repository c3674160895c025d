"""KV page transfer between a prefill worker and a decode worker.

One channel per (prefill, decode) pair: a torch.distributed process group of two ranks
(rank 0 sends, rank 1 receives), gloo for CPU tensors and NCCL for CUDA tensors, rendezvous
through a TCPStore the prefill side opens (`listen`) and names in the gRPC handshake. Pages go
in a few messages of consecutive layers, each a contiguous block [2 * layers, n, page] staged
in a buffer the channel keeps, so gathering overlaps sending and scattering overlaps
receiving, and the receiver's page ids need not match the sender's. Every operation has a
timeout; a failed or timed-out channel raises TransferError and must be closed and rebuilt,
never reused. Transfers on one channel run one at a time (`lock`): both sides count them to
pair up message tags.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from strata.kv.pool import KVCache


class TransferError(RuntimeError):
    """The peer did not connect, or a send/receive failed or timed out."""


@dataclass(frozen=True)
class TransferStats:
    bytes: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


@contextmanager
def _as_transfer_error() -> Iterator[None]:
    try:
        yield
    except TransferError:
        raise
    except Exception as exc:  # gloo/NCCL raise RuntimeError and friends
        raise TransferError(f"KV transfer failed: {exc}") from None


def kv_layout(kv: KVCache) -> str:
    """What both ends of a channel must agree on: layers x page_size x kv_heads x head_dim."""
    layers, _, _, page_size, heads, dim = kv.data.shape
    return f"{layers}x{page_size}x{heads}x{dim}:{str(kv.data.dtype).removeprefix('torch.')}"


def listen(timeout: float) -> dist.TCPStore:
    """The sender's side of a handshake: a store on a free port (`.port`) of this host, for
    the peer to join (pass it to KVChannel as `store`)."""
    return dist.TCPStore("0.0.0.0", 0, 2, True, timedelta(seconds=timeout), wait_for_workers=False)


class KVChannel:
    def __init__(
        self,
        kv: KVCache,
        host: str,
        port: int,
        rank: int,
        timeout: float = 30.0,
        messages: int = 2,
        store: dist.TCPStore | None = None,
    ) -> None:
        if rank not in (0, 1):
            raise ValueError("rank must be 0 (prefill, sends) or 1 (decode, receives)")
        self.kv, self.rank, self.timeout = kv, rank, timedelta(seconds=timeout)
        self.messages = max(1, messages)
        self.lock = threading.Lock()  # one transfer at a time (tags pair up by count)
        try:
            if store is None:
                store = dist.TCPStore(host, port, 2, rank == 0, timeout=self.timeout)
            self.group: Any
            if kv.data.is_cuda:  # NOTE: not yet run on a GPU (none lent so far)
                options = dist.ProcessGroupNCCL.Options()
                self.group = dist.ProcessGroupNCCL(store, rank, 2, options)
            else:
                self.group = dist.ProcessGroupGloo(store, rank, 2, self.timeout)
        except Exception as exc:  # the store raises on a peer that never comes
            raise TransferError(f"KV channel {host}:{port} rank {rank}: {exc}") from None
        self._tag = 0
        self._staging = torch.empty(0, dtype=torch.uint8, device=kv.data.device)

    def _stage(self, n: int) -> torch.Tensor:
        """Staging [layers * 2, n, page_size * kv_heads * head_dim] in one reused buffer
        (fresh memory would cost page faults on every transfer): layer l's K and V rows are
        2l and 2l + 1, so a range of layers is one contiguous message."""
        data = self.kv.data
        shape = (data.shape[0] * 2, n, data[0, 0, 0].numel())
        need = shape[0] * shape[1] * shape[2] * data.element_size()
        if self._staging.numel() < need:
            self._staging = torch.empty(need, dtype=torch.uint8, device=data.device)
        return self._staging[:need].view(data.dtype).view(shape)

    def _rows(self) -> torch.Tensor:
        """The pool as [layers * 2, pages, page elements] (a view)."""
        data = self.kv.data
        return data.view(data.shape[0] * 2, data.shape[2], -1)

    def send(self, pages: list[int]) -> TransferStats:
        """Send these pages' K and V to the peer (which receives the same number of pages).
        Group by group of layers, so gathering the next group overlaps sending this one."""
        start, tag, works = time.perf_counter(), self._next_tag(), []
        index = torch.tensor(pages, device=self.kv.data.device)
        rows, stage = self._rows(), self._stage(len(pages))
        with _as_transfer_error():
            for i, (lo, hi) in enumerate(self._chunks()):
                torch.index_select(rows[2 * lo : 2 * hi], 1, index, out=stage[2 * lo : 2 * hi])
                works.append(self.group.send([stage[2 * lo : 2 * hi]], 1, tag + i))
            self._wait(works)
        return TransferStats(stage.numel() * stage.element_size(), time.perf_counter() - start)

    def recv(self, pages: list[int]) -> TransferStats:
        """Receive len(pages) pages from the peer into these (reserved) page ids. Every
        group's receive is posted at once; each is scattered as soon as it lands."""
        start, tag = time.perf_counter(), self._next_tag()
        rows, stage = self._rows(), self._stage(len(pages))
        with _as_transfer_error():
            chunks = self._chunks()
            works = [self.group.recv([stage[2 * lo : 2 * hi]], 0, tag + i)
                     for i, (lo, hi) in enumerate(chunks)]  # fmt: skip
            for work, (lo, hi) in zip(works, chunks):
                self._wait([work])
                self._scatter(rows[2 * lo : 2 * hi], stage[2 * lo : 2 * hi], pages)
        return TransferStats(stage.numel() * stage.element_size(), time.perf_counter() - start)

    @staticmethod
    def _scatter(rows: torch.Tensor, block: torch.Tensor, pages: list[int]) -> None:
        if rows.is_cuda:
            rows.index_copy_(1, torch.tensor(pages, device=rows.device), block)
        else:  # on CPU one strided copy per page runs at memcpy speed; index_copy_ at a third
            for i, page in enumerate(pages):
                rows[:, page].copy_(block[:, i])

    def _chunks(self) -> list[tuple[int, int]]:
        """Layer ranges sent as one message each: a few, so copies overlap the wire without
        paying gloo's per-message cost for every layer."""
        layers = self.kv.data.shape[0]
        step = -(-layers // self.messages)
        return [(lo, min(lo + step, layers)) for lo in range(0, layers, step)]

    def _next_tag(self) -> int:
        self._tag += 1  # both sides count transfers, so tags pair up in order
        return self._tag * 1024  # one tag per layer below the next transfer's

    def _wait(self, works: list[Any]) -> None:
        for work in works:
            if not work.wait(self.timeout):
                raise TransferError(
                    f"KV transfer failed: no completion within {self.timeout.total_seconds():g}s"
                )

    def close(self) -> None:
        self.group = None
