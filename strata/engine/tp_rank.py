"""Ranks 1..N-1 of tensor parallelism (strata.model.tp): processes rank 0's runner starts,
each loading its slice of the model and running every forward rank 0 broadcasts.

They are processes of their own (`python -m strata.engine.tp_rank RANK ADDRESS PARENT`, the
configs pickled on stdin), not multiprocessing children: the engine process that starts
them is a daemonic one, which may not have those. Each ends with the process that started
it (PR_SET_PDEATHSIG), and a rank 0 that goes away fails its next collective.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys

import torch
import torch.distributed as dist

from strata.config import KVPoolConfig, ModelConfig
from strata.model.tp import free_port


def start_followers(
    model: ModelConfig, pool: KVPoolConfig, num_pages: int
) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """Start ranks 1..tp_size-1; returns the group's address (rank 0 then joins there as
    the group's store) and the processes."""
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for rank in range(1, model.tp_size):
        cmd = [sys.executable, "-m", __name__, str(rank), address, str(os.getpid())]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps((model, pool, num_pages)))
        proc.stdin.close()
        procs.append(proc)
    return address, procs


def _die_with(parent: int) -> None:
    """End this process when the one that started it ends (Linux PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:  # not Linux: a dead rank 0 still fails this rank's next collective
        return
    if os.getppid() != parent:
        os._exit(0)


def follow(
    rank: int, address: str, model: ModelConfig, pool: KVPoolConfig, num_pages: int,
    parent: int,
) -> None:  # fmt: skip
    """Load this rank's slice, then run every forward rank 0 sends until it says stop."""
    from strata.engine.runner import ModelRunner

    _die_with(parent)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // model.tp_size))
    runner = ModelRunner.from_config(model, pool, rank=rank, address=address,
                                     num_pages=num_pages)  # fmt: skip
    assert runner.tp is not None
    while True:
        msg = runner.tp.receive()
        if msg[0] == "stop":
            break
        _, chunks, all_logits = msg
        runner.forward(chunks, all_logits)
    dist.destroy_process_group()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    _model, _pool, _pages = pickle.loads(sys.stdin.buffer.read())
    follow(int(sys.argv[1]), sys.argv[2], _model, _pool, _pages, int(sys.argv[3]))
