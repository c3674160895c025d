"""KV page transfer over gloo between two real processes: exact bytes, into different page
ids; a peer that never comes or never sends is a TransferError within the timeout."""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import pytest
import torch

from launch.local import free_port
from strata.kv.pool import KVCache
from strata.kv.transfer import KVChannel, TransferError

SHAPE = dict(num_layers=3, num_pages=12, page_size=4, num_kv_heads=2, head_dim=8)
SRC, DST = [3, 1, 7, 10], [0, 5, 2, 11]


def filled(dtype: torch.dtype) -> KVCache:
    kv = KVCache(**SHAPE, dtype=dtype, device="cpu")
    torch.manual_seed(0)
    kv.data.copy_(torch.randn(kv.data.shape))
    return kv


def sender(
    port: int,
    dtype: torch.dtype,
    rounds: int,
    out: mp.Queue,
    delay: float = 0,
    started: Any = None,
) -> None:
    """started (an Event): set once this process runs, right before it opens the channel."""
    if started is not None:
        started.set()
    try:
        channel = KVChannel(filled(dtype), "127.0.0.1", port, rank=0, timeout=20)
        time.sleep(delay)
        for _ in range(rounds):
            channel.send(SRC)
        out.put("ok")
    except Exception as exc:  # reported to the test, which fails with it
        out.put(repr(exc))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pages_arrive_exactly_in_the_reserved_page_ids(dtype):
    port = free_port()
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=sender, args=(port, dtype, 2, out))
    proc.start()
    try:
        kv = KVCache(**SHAPE, dtype=dtype, device="cpu")
        channel = KVChannel(kv, "127.0.0.1", port, rank=1, timeout=20)
        expected = filled(dtype).data[SRC]
        for _ in range(2):
            kv.data.zero_()
            stats = channel.recv(DST)
            assert torch.equal(kv.data[DST], expected)
            others = [p for p in range(SHAPE["num_pages"]) if p not in DST]
            assert not kv.data[others].any()  # nothing outside the reservation
            assert stats.bytes == len(DST) * kv.bytes_per_page
        assert out.get(timeout=30) == "ok"
    finally:
        proc.join(30)


def test_a_peer_that_never_sends_times_out():
    port = free_port()
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    started = ctx.Event()  # its start (imports) is not what the 2 s timeout is about
    proc = ctx.Process(target=sender, args=(port, torch.float32, 0, out, 0, started))
    proc.start()  # connects, never sends
    try:
        assert started.wait(60)
        channel = KVChannel(
            KVCache(**SHAPE, dtype=torch.float32, device="cpu"),
            "127.0.0.1",
            port,
            rank=1,
            timeout=2,
        )
        start = time.monotonic()
        with pytest.raises(TransferError, match="KV transfer failed"):
            channel.recv(DST)
        assert time.monotonic() - start < 10
    finally:
        proc.join(30)


def test_a_late_send_after_a_timeout_lands_nowhere():
    """Pages are received in place, so a timed-out receive must close the channel: the
    sender's late pages fail on its side and never reach pages the receiver freed."""
    port = free_port()
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    started = ctx.Event()
    proc = ctx.Process(target=sender, args=(port, torch.float32, 1, out, 4.0, started))
    proc.start()
    try:
        kv = KVCache(**SHAPE, dtype=torch.float32, device="cpu")
        # the 1.5 s timeout is the receive's; the sender's start (a spawned interpreter: 1-3
        # s under load) is not part of it
        assert started.wait(30)
        channel = KVChannel(kv, "127.0.0.1", port, rank=1, timeout=1.5)
        with pytest.raises(TransferError, match="no completion|Timed out"):
            channel.recv(DST)
        assert "TransferError" in out.get(timeout=30)  # the sender tried, and failed
        assert not kv.data.any()
        with pytest.raises(TransferError, match="closed"):
            channel.recv(DST)  # a failed channel is not reused
    finally:
        proc.join(30)


def test_a_peer_that_never_connects_is_an_error():
    kv = KVCache(**SHAPE, dtype=torch.float32, device="cpu")
    start = time.monotonic()
    with pytest.raises(TransferError, match="KV channel"):
        KVChannel(kv, "127.0.0.1", free_port(), rank=1, timeout=2)
    assert time.monotonic() - start < 10
