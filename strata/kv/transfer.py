"""KV page transfer between a prefill worker and a decode worker.

One channel per (prefill, decode) pair: a torch.distributed process group of two ranks
(rank 0 sends, rank 1 receives), gloo for CPU tensors and NCCL for CUDA tensors, rendezvous
through a TCPStore the prefill side opens (`listen`) and names in the gRPC handshake.

The pool is page-major (a page holds every layer's K and V in one block), so on CPU every
page goes as its own message straight from the sender's page to the receiver's reserved page:
no gather, no scatter, no staging, and the receiver's page ids need not match the sender's.
On CUDA the pages are gathered into one buffer, sent in one NCCL message and scattered (on
the device, at memory speed). Every operation has a timeout; a failed or timed-out channel
is aborted at once (its connection closed, so no late byte lands in a page freed meanwhile),
raises TransferError, and must be rebuilt, never reused. Transfers on one channel run one at
a time (`lock`): both sides count them to pair up message tags.
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

TAG_BITS = 20  # a transfer's messages take tags [n << TAG_BITS, (n << TAG_BITS) + pages)


class TransferError(RuntimeError):
    """The peer did not connect, or a send/receive failed or timed out."""


@dataclass(frozen=True)
class TransferStats:
    bytes: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


def kv_layout(kv: KVCache, tp_size: int = 1) -> str:
    """What both ends of a channel must agree on: layers x page rows x kv_heads (of one
    rank) x head_dim, the dtype, and the tensor-parallel size."""
    _, layers, _, rows, heads, dim = kv.data.shape  # rows: page_size tokens + the summary
    return f"{layers}x{rows}x{heads}x{dim}:{str(kv.data.dtype).removeprefix('torch.')}" + (
        f":tp{tp_size}" if tp_size > 1 else ""
    )


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
        store: dist.TCPStore | None = None,
    ) -> None:
        if rank not in (0, 1):
            raise ValueError("rank must be 0 (prefill, sends) or 1 (decode, receives)")
        self.kv, self.rank, self.timeout = kv, rank, timeout
        self.lock = threading.Lock()  # one transfer at a time (tags pair up by count)
        self._zero_copy = not kv.data.is_cuda
        try:
            if store is None:
                store = dist.TCPStore(host, port, 2, rank == 0, timeout=timedelta(seconds=timeout))
            self.group: Any
            if kv.data.is_cuda:  # NOTE: not yet run on a GPU (none lent so far)
                options = dist.ProcessGroupNCCL.Options()
                self.group = dist.ProcessGroupNCCL(store, rank, 2, options)
            else:
                self.group = dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=timeout))
        except Exception as exc:  # the store raises on a peer that never comes
            raise TransferError(f"KV channel {host}:{port} rank {rank}: {exc}") from None
        self._count = 0
        self._staging = torch.empty(0, dtype=kv.data.dtype, device=kv.data.device)

    def send(self, pages: list[int]) -> TransferStats:
        """Send these pages' K and V of every layer to the peer, which receives the same
        number of pages into its own page ids."""
        start = time.perf_counter()
        with self._transfer(pages) as tag:
            if self._zero_copy:
                works = [
                    self.group.send([self.kv.page(p)], 1, tag + i) for i, p in enumerate(pages)
                ]
            else:
                stage = self._stage(len(pages))
                torch.index_select(self.kv.data, 0, self._index(pages), out=stage)
                works = [self.group.send([stage], 1, tag)]
            self._wait(works, start)
        return TransferStats(len(pages) * self.kv.bytes_per_page, time.perf_counter() - start)

    def recv(self, pages: list[int]) -> TransferStats:
        """Receive len(pages) pages from the peer into these (reserved) page ids."""
        start = time.perf_counter()
        with self._transfer(pages) as tag:
            if self._zero_copy:
                works = [
                    self.group.recv([self.kv.page(p)], 0, tag + i) for i, p in enumerate(pages)
                ]
                self._wait(works, start)
            else:
                stage = self._stage(len(pages))
                self._wait([self.group.recv([stage], 0, tag)], start)
                self.kv.data.index_copy_(0, self._index(pages), stage)
        return TransferStats(len(pages) * self.kv.bytes_per_page, time.perf_counter() - start)

    @contextmanager
    def _transfer(self, pages: list[int]) -> Iterator[int]:
        """The transfer's first tag; any failure aborts the channel and is a TransferError."""
        if self.group is None:
            raise TransferError("KV transfer failed: the channel is closed (it failed before)")
        if len(pages) >= 1 << TAG_BITS:
            raise ValueError(f"a transfer takes fewer than {1 << TAG_BITS} pages")
        self._count += 1  # both sides count transfers, so tags pair up in order
        try:
            yield (self._count % 2048) << TAG_BITS
        except Exception as exc:  # gloo/NCCL raise RuntimeError and friends
            self.close()
            if isinstance(exc, TransferError):
                raise
            raise TransferError(f"KV transfer failed: {exc}") from None

    def _stage(self, n: int) -> torch.Tensor:
        """A reused [n, *page] buffer (fresh device memory on every transfer would cost)."""
        page = self.kv.data.shape[1:]
        if self._staging.shape[0] < n:
            self._staging = torch.empty(
                n, *page, dtype=self.kv.data.dtype, device=self.kv.data.device
            )
        return self._staging[:n]

    def _index(self, pages: list[int]) -> torch.Tensor:
        return torch.tensor(pages, dtype=torch.int64, device=self.kv.data.device)

    def _wait(self, works: list[Any], start: float) -> None:
        """Every message done within the channel's timeout of the transfer's start."""
        for work in works:
            left = self.timeout - (time.perf_counter() - start)
            if left <= 0 or not work.wait(timedelta(seconds=left)):
                raise TransferError(f"KV transfer failed: no completion within {self.timeout:g}s")

    def close(self) -> None:
        """Abort the group: its connection closes, so no pending receive writes any more."""
        group, self.group = self.group, None
        if group is not None:
            group.abort()


# What rank 0 asks of each other rank of a tensor-parallel worker for a KV channel (each rank
# moves its own KV heads over a channel of its own, to the peer's rank of that number).


@dataclass(frozen=True, slots=True)
class Listen:
    """The sending side: open a store for the peer's rank (joined later); answers its port."""

    cid: str
    timeout: float


@dataclass(frozen=True, slots=True)
class Join:
    """The receiving side: join the peer rank's store at host:port."""

    cid: str
    host: str
    port: int
    timeout: float


@dataclass(frozen=True, slots=True)
class Drop:
    cid: str


@dataclass(frozen=True, slots=True)
class Move:
    """Send or receive these pages on the channel; answers the bytes moved."""

    cid: str
    direction: str  # "send" or "recv"
    pages: list[int]


ChannelOp = Listen | Join | Drop | Move


class RankedChannel:
    """The KV channel of a pair of tensor-parallel workers: rank 0's own KVChannel (its KV
    heads), and the same transfer run by each other rank over a channel of its own to the
    peer's rank of that number. `ranks` reaches those ranks (strata.engine.tp_rank.RankLinks:
    `call(op)` of a ChannelOp returns a future of each rank's answer)."""

    def __init__(self, own: KVChannel, cid: str, ranks: Any) -> None:
        self.own, self.cid, self.ranks = own, cid, ranks
        self.lock, self.kv, self.timeout = own.lock, own.kv, own.timeout

    def send(self, pages: list[int]) -> TransferStats:
        return self._everywhere("send", self.own.send, pages)

    def recv(self, pages: list[int]) -> TransferStats:
        return self._everywhere("recv", self.own.recv, pages)

    def _everywhere(self, op: str, own: Any, pages: list[int]) -> TransferStats:
        start = time.perf_counter()
        futures = self.ranks.call(Move(self.cid, op, pages))
        try:
            moved = own(pages).bytes + sum(f.result(timeout=self.timeout) for f in futures)
        except Exception as exc:  # any rank's failure fails the pair's transfer
            self.close()
            if isinstance(exc, TransferError):
                raise
            raise TransferError(f"KV transfer failed on another rank: {exc}") from None
        return TransferStats(moved, time.perf_counter() - start)

    def close(self) -> None:
        self.own.close()
        self.ranks.call(Drop(self.cid))
