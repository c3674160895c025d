"""Tensor parallelism (`--tp-size N`): one model over N ranks, Megatron-style.

Each rank holds a slice of every layer: the query and KV heads of column-parallel QKV, the
columns of gate/up, the matching rows of the row-parallel output and down projections
(whose partial sums are all-reduced), and a slice of the vocabulary (embedding rows and LM
head rows; a token's embedding is all-reduced from the one rank that has it, the logits are
all-gathered). Its KV pool holds its own KV heads. The collectives are torch.distributed's:
NCCL on CUDA (a rank per GPU), gloo on CPU (a rank per process, on loopback).

Rank 0 is the runner the engine drives: before each forward it broadcasts the batch's
chunks, and ranks 1..N-1 (strata.engine.tp_rank, each a process rank 0 started) run the
same forward on their slices. Only rank 0 samples.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from strata.model.spec import ModelSpec

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)
# a rank that waits longer than this in a collective (a peer died) fails instead of hanging
TIMEOUT = timedelta(seconds=60)


def check_tp(spec: ModelSpec, size: int) -> None:
    """Raise ValueError unless the model's heads, KV heads and MLP width split over size."""
    if size < 1:
        raise ValueError("--tp-size must be at least 1")
    if spec.num_experts and size > 1:
        raise ValueError(
            f"{spec.architecture}: mixture-of-experts models do not run under tensor "
            "parallelism yet (--tp-size 1)"
        )
    parts = {
        "attention heads": spec.num_heads,
        "KV heads": spec.num_kv_heads,
        "intermediate size": spec.intermediate_size,
    }
    bad = [f"{name} ({n})" for name, n in parts.items() if n % size]
    if bad:
        raise ValueError(f"--tp-size {size} must divide the model's {', '.join(bad)}")


def local_spec(spec: ModelSpec, size: int) -> ModelSpec:
    """The slice of the model one rank runs: its share of the heads and of the MLP."""
    return dataclasses.replace(
        spec,
        num_heads=spec.num_heads // size,
        num_kv_heads=spec.num_kv_heads // size,
        intermediate_size=spec.intermediate_size // size,
    )


def vocab_rows(vocab: int, size: int) -> int:
    """Vocabulary rows per rank (the last rank's slice is padded with zero rows)."""
    return -(-vocab // size)


def shard_weights(
    spec: ModelSpec, weights: dict[str, torch.Tensor], rank: int, size: int
) -> dict[str, torch.Tensor]:
    """Rank `rank`'s slices of fused weights (Family.fuse's layout)."""
    if size == 1:
        return weights
    local = local_spec(spec, size)
    q, kv, inter = local.q_size, local.kv_size, local.intermediate_size

    def rows(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
        return t[start + rank * n : start + (rank + 1) * n]

    def qkv(t: torch.Tensor) -> torch.Tensor:  # [q | k | v] rows: each part's own slice
        return torch.cat(
            [rows(t, 0, q), rows(t, spec.q_size, kv), rows(t, spec.q_size + spec.kv_size, kv)]
        )

    def vocab(t: torch.Tensor) -> torch.Tensor:
        n = vocab_rows(spec.vocab_size, size)
        part = t[rank * n : (rank + 1) * n]
        return F.pad(part, (0, 0, 0, n - part.shape[0]))

    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("qkv", "qkv_bias"):
            part = qkv(t)
        elif leaf == "o_proj":
            part = t[:, rank * q : (rank + 1) * q]
        elif leaf == "gate_up":
            part = torch.cat([rows(t, 0, inter), rows(t, spec.intermediate_size, inter)])
        elif leaf == "down":
            part = t[:, rank * inter : (rank + 1) * inter]
        elif leaf in ("embed_tokens", "lm_head"):
            part = vocab(t)
        else:  # norms: every rank has them whole
            part = t
        out[name] = part.contiguous()
    if spec.tie_word_embeddings:  # the LM head is the (sliced) embedding
        out.setdefault("lm_head", out["embed_tokens"])
    return out


@dataclass
class TPGroup:
    """This process's rank in the tensor-parallel group, and the group's collectives."""

    rank: int
    size: int
    vocab_size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Embeddings of ids from each rank's slice of the vocabulary, summed over ranks."""
        start = self.rank * table.shape[0]
        local = ids - start
        mine = (local >= 0) & (local < table.shape[0])
        x = F.embedding(local.clamp(0, table.shape[0] - 1), table)
        x = x * mine[:, None].to(x.dtype)
        return self.all_reduce(x)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Each rank's logits [rows, vocab slice] -> every rank's [rows, vocab]."""
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        dist.all_gather(parts, logits.contiguous())
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]

    def send(self, msg: Any) -> None:
        """Rank 0: the next step for every other rank (strata.engine.messages.Forward)."""
        dist.broadcast_object_list([msg], src=0)

    def receive(self) -> Any:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def join(rank: int, size: int, address: str, device: str) -> None:
    """Join the process group at address (rank 0 listens there) on this rank's device."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"tcp://{address}", rank=rank, world_size=size, timeout=TIMEOUT
    )


def rank_device(device: str, rank: int) -> str:
    """Rank r of a CUDA group runs on cuda:r; CPU ranks share the CPU."""
    return f"cuda:{rank}" if device.startswith("cuda") else device
