"""Ranks 1..N-1 of tensor parallelism (strata.model.tp): processes rank 0's runner starts,
each loading its slice of the model and running every forward rank 0 broadcasts.

They are processes of their own (`python -m strata.engine.tp_follower RANK ADDRESS PARENT FD`,
the configs pickled on stdin), not multiprocessing children: the engine process that starts
them is a daemonic one, which may not have those. Each ends with the process that started
it (PR_SET_PDEATHSIG), and a rank 0 that goes away fails its next collective.

Beside the forwards (collectives on the group), rank 0 reaches each rank over a socket of
its own (`RankLinks`) for what runs beside them: a split worker's KV transfers, in which
every rank moves its own KV heads over a channel of its own to the peer's rank of the same
number (strata.kv.transfer.RankedChannel). Each call there is a LinkCall of a ChannelOp
(strata.engine.messages), run on a thread of the rank and answered by a LinkReply.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from strata.config import KVPoolConfig, ModelConfig
from strata.engine.messages import LinkCall, LinkReply
from strata.kv.pool import KVCache
from strata.kv.transfer import ChannelOp, Drop, Join, KVChannel, Listen, Move, listen
from strata.model.tp import free_port

log = logging.getLogger(__name__)


class RankGone(RuntimeError):
    """A rank's control link closed (the rank died) before it answered."""


class RankLinks:
    """Rank 0's control links to ranks 1..N-1."""

    def __init__(self, conns: list[Connection]) -> None:
        self._conns = conns
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._pending: list[dict[int, Future[Any]]] = [{} for _ in conns]
        for i, conn in enumerate(conns):
            threading.Thread(
                target=self._read, args=(i, conn), daemon=True, name=f"strata-tp-link{i + 1}"
            ).start()

    @property
    def size(self) -> int:
        return len(self._conns)

    def call(self, op: ChannelOp) -> list[Future[Any]]:
        """The same operation on every rank; a future of each one's answer."""
        return self.call_each([op] * len(self._conns))

    def call_each(self, ops: list[ChannelOp]) -> list[Future[Any]]:
        """ops[i] to rank i + 1."""
        futures: list[Future[Any]] = []
        with self._lock:
            for i, (conn, op) in enumerate(zip(self._conns, ops)):
                call_id, fut = next(self._ids), Future[Any]()
                futures.append(fut)
                self._pending[i][call_id] = fut
                try:
                    conn.send(LinkCall(call_id, op))
                except OSError as exc:
                    self._pending[i].pop(call_id, None)
                    fut.set_exception(RankGone(f"rank {i + 1} is gone: {exc}"))
        return futures

    def _read(self, i: int, conn: Connection) -> None:
        try:
            while True:
                reply: LinkReply = conn.recv()
                with self._lock:
                    fut = self._pending[i].pop(reply.call_id)
                if reply.ok:
                    fut.set_result(reply.value)
                else:
                    fut.set_exception(RuntimeError(f"rank {i + 1}: {reply.value}"))
        except (EOFError, OSError):
            with self._lock:
                waiting, self._pending[i] = self._pending[i], {}
            for fut in waiting.values():
                fut.set_exception(RankGone(f"rank {i + 1} went away"))

    def close(self) -> None:
        for conn in self._conns:
            conn.close()


class RankCalls:
    """A rank's side of its control link: the KV channels of its own KV heads."""

    def __init__(self, conn: Connection, kv: KVCache) -> None:
        self.conn, self.kv = conn, kv
        self.channels: dict[str, Future[KVChannel]] = {}
        self._threads = ThreadPoolExecutor(16, thread_name_prefix="strata-tp-call")
        self._send_lock = threading.Lock()

    def serve(self) -> None:
        """Answer calls until rank 0 closes the link."""
        try:
            while True:
                call: LinkCall = self.conn.recv()
                self._threads.submit(self._answer, call)
        except (EOFError, OSError):
            return

    def _answer(self, call: LinkCall) -> None:
        try:
            reply = LinkReply(call.call_id, True, self._run(call.op))
        except Exception as exc:
            reply = LinkReply(call.call_id, False, f"{type(exc).__name__}: {exc}")
        with self._send_lock, contextlib.suppress(OSError):  # rank 0 went away
            self.conn.send(reply)

    def _run(self, op: ChannelOp) -> Any:
        match op:
            case Listen(cid, timeout):  # a store for the peer's rank, joined later
                store = listen(timeout)
                self.channels[cid] = self._threads.submit(
                    KVChannel, self.kv, "", 0, rank=0, timeout=timeout, store=store
                )
                return store.port
            case Join(cid, host, port, timeout):
                fut: Future[KVChannel] = Future()
                fut.set_result(KVChannel(self.kv, host, port, rank=1, timeout=timeout))
                self.channels[cid] = fut
                return None
            case Drop(cid):
                dropped = self.channels.pop(cid, None)
                if dropped is not None and dropped.done() and dropped.exception() is None:
                    dropped.result().close()
                return None
            case Move(cid, direction, pages):
                channel = self.channels[cid].result()
                with channel.lock:
                    stats = channel.send(pages) if direction == "send" else channel.recv(pages)
                return stats.bytes


def start_followers(
    model: ModelConfig, pool: KVPoolConfig, num_pages: int
) -> tuple[str, list[subprocess.Popen[bytes]], RankLinks]:
    """Start ranks 1..tp_size-1; returns the group's address (rank 0 then joins there as
    the group's store), the processes and the control links to them."""
    address = f"127.0.0.1:{free_port()}"
    procs, conns = [], []
    for rank in range(1, model.tp_size):
        ours, theirs = socket.socketpair()
        cmd = [
            sys.executable,
            "-m",
            "strata.engine.tp_follower",
            str(rank),
            address,
            str(os.getpid()),
            str(theirs.fileno()),
        ]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, pass_fds=[theirs.fileno()])
        theirs.close()
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps((model, pool, num_pages)))
        proc.stdin.close()
        procs.append(proc)
        conns.append(Connection(ours.detach()))
    return address, procs, RankLinks(conns)
