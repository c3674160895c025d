"""The attention backends by name: strata.config.ATTENTION_BACKENDS names each one's class.
A backend is an AttentionBackend (strata.attention.base, whose docstring says how to write
one); adding one is its module and a line in that table."""

from __future__ import annotations

import importlib

from strata.attention.base import AttentionBackend
from strata.config import ATTENTION_BACKENDS, SparseConfig


def backend_class(name: str) -> type[AttentionBackend]:
    path = ATTENTION_BACKENDS.get(name) or ""
    if ":" not in path:
        raise ValueError(
            f"unknown attention backend {name!r}; choose one of {tuple(ATTENTION_BACKENDS)}"
        )
    module, cls = path.split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:  # e.g. triton, not installed here
        raise ValueError(f"--attention-backend {name} cannot load here: {e}") from e


def make_backend(
    name: str,
    device: str,
    scale: float,
    page_size: int,
    sparse: SparseConfig | None = None,
    softcap: float | None = None,
    windows: tuple[int, ...] = (),
) -> AttentionBackend:
    """The attention backend `name` on `device` ("auto": triton on CUDA, else cpu; torch
    for a model whose attention logits are soft-capped where that one has no soft cap)."""
    if name == "auto":
        name = "triton" if device.startswith("cuda") else "cpu"
        if softcap is not None and not backend_class(name).supports_softcap:
            name = "torch"
    cls = backend_class(name)
    cls.check_device(device)
    if softcap is not None and not cls.supports_softcap:
        raise ValueError(
            f"--attention-backend {name} has no attention logit soft-capping, which this "
            "model uses: leave it to auto, or name torch"
        )
    return cls(scale, page_size, sparse, softcap=softcap, windows=windows)
