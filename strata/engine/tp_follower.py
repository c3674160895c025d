"""The process of a rank 1..N-1 of tensor parallelism (`python -m strata.engine.tp_follower
RANK ADDRESS PARENT FD`, started by tp_rank.start_followers, the configs pickled on stdin):
it loads its slice of the model and runs every forward rank 0 broadcasts."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
from multiprocessing.connection import Connection

import torch.distributed as dist

from strata.config import KVPoolConfig, ModelConfig
from strata.engine.messages import Forward, StopRanks
from strata.engine.runner import ModelRunner
from strata.engine.tp_rank import RankCalls


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
    rank: int,
    address: str,
    model: ModelConfig,
    pool: KVPoolConfig,
    num_pages: int,
    parent: int,
    link: Connection,
) -> None:
    """Load this rank's slice, answer rank 0's calls on a thread, and run every forward rank
    0 sends until it says stop."""
    _die_with(parent)
    runner = ModelRunner.from_config(model, pool, rank=rank, address=address, num_pages=num_pages)
    assert runner.tp is not None
    calls = RankCalls(link, runner.kv)
    threading.Thread(target=calls.serve, name="strata-tp-calls", daemon=True).start()
    while True:
        match runner.tp.receive():
            case Forward(chunks, all_logits):
                runner.forward(chunks, all_logits)
            case StopRanks():
                break
    dist.destroy_process_group()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    _model, _pool, _pages = pickle.loads(sys.stdin.buffer.read())
    follow(
        int(sys.argv[1]),
        sys.argv[2],
        _model,
        _pool,
        _pages,
        int(sys.argv[3]),
        Connection(int(sys.argv[4])),
    )
