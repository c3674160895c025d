"""Configuration: one frozen dataclass per concern, built once at start-up.

All environment variables strata reads are read here, and all are prefixed ``STRATA_``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("none", "int4")


def env(name: str, default: str | None = None) -> str | None:
    """The value of ``STRATA_<name>``; the one place strata reads its environment."""
    return os.environ.get(f"STRATA_{name}", default)


def cache_dir() -> Path:
    """Where converted weights and tokenizers are kept (``STRATA_CACHE_DIR`` overrides)."""
    explicit = env("CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "strata"


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and on CPUs with avx512_bf16, float32 otherwise."""
    if name == "auto":
        if device.startswith("cuda") or cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class ModelConfig:
    model_path: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "auto"
    device: str = "cpu"
    quantization: str = "none"  # "int4": group-wise weight-only int4 linear layers

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"unknown quantization {self.quantization!r}; choose one of {QUANTIZATIONS}"
            )
        resolve_dtype(self.dtype, self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.device)


@dataclass(frozen=True)
class CacheConfig:
    page_size: int = 16
    num_pages: int = 4096

    def __post_init__(self) -> None:
        if self.page_size <= 0 or self.num_pages <= 0:
            raise ValueError("page_size and num_pages must be positive")


@dataclass(frozen=True)
class SchedulerConfig:
    enable_radix_cache: bool = True
    max_running_requests: int = 64
    max_batch_tokens: int = 512  # per step: decode tokens plus prefill chunks

    def __post_init__(self) -> None:
        if self.max_running_requests < 1 or self.max_batch_tokens < 1:
            raise ValueError("max_running_requests and max_batch_tokens must be positive")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 30000
    served_model_name: str | None = None
    log_level: str = "info"
    grpc_port: int = 0  # the gRPC Gateway: 0 = port + 1, -1 = off
