"""The attention backends by name (strata.config.ATTENTION_BACKENDS). A backend is a class
with AttentionBackend's methods (strata.attention.backend); adding one is its module and a
line in BACKENDS."""

from __future__ import annotations

import os
from collections.abc import Callable

from strata.attention.backend import AttentionBackend, TorchAttention
from strata.config import SparseConfig

Factory = Callable[[str, float, int, SparseConfig | None], AttentionBackend]


def _torch(
    device: str, scale: float, page_size: int, sparse: SparseConfig | None
) -> AttentionBackend:
    return TorchAttention(scale, page_size, sparse, kernels=False)


def _cpu(
    device: str, scale: float, page_size: int, sparse: SparseConfig | None
) -> AttentionBackend:
    return TorchAttention(scale, page_size, sparse, kernels=True)


def _triton(
    device: str, scale: float, page_size: int, sparse: SparseConfig | None
) -> AttentionBackend:
    if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "--attention-backend triton needs a CUDA device (on CPU it runs only "
            "under TRITON_INTERPRET=1, slowly: for tests)"
        )
    from strata.attention.triton_backend import TritonAttention  # imports triton

    return TritonAttention(scale, page_size, sparse)


BACKENDS: dict[str, Factory] = {"torch": _torch, "cpu": _cpu, "triton": _triton}


def make_backend(
    name: str, device: str, scale: float, page_size: int, sparse: SparseConfig | None = None
) -> AttentionBackend:
    """The attention backend `name` on `device` ("auto": triton on CUDA, else cpu)."""
    if name == "auto":
        name = "triton" if device.startswith("cuda") else "cpu"
    return BACKENDS[name](device, scale, page_size, sparse)
