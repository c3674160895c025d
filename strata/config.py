"""Configuration: one frozen dataclass per concern, built once at start-up.

Every environment variable strata reads is read here: its own, prefixed ``STRATA_`` (`env`),
and the standard ones it honours (`system_env`): ``CC`` and ``CXX`` (the compilers of the CPU
kernels), ``OMP_WAIT_POLICY`` (passed on to the services `strata up` starts),
``GLIBC_TUNABLES`` and ``GOMP_SPINCOUNT`` (set for the engine process, `engine_environment`)
and ``XDG_CACHE_HOME``.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a dtype is resolved: the gateway, the cache
    import torch  # service and the launcher never import it (2 s a process)

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("auto", "none", "int4")


def env(name: str, default: str | None = None) -> str | None:
    """The value of ``STRATA_<name>``; the one place strata reads its environment."""
    return os.environ.get(f"STRATA_{name}", default)


SYSTEM_VARIABLES = (
    "CC",
    "CXX",
    "GLIBC_TUNABLES",
    "GOMP_SPINCOUNT",
    "OMP_WAIT_POLICY",
    "XDG_CACHE_HOME",
)


def system_env(name: str, default: str | None = None) -> str | None:
    """A standard variable strata honours (one of SYSTEM_VARIABLES)."""
    assert name in SYSTEM_VARIABLES, name
    return os.environ.get(name, default)


def huge_page_malloc() -> str:
    """``GLIBC_TUNABLES`` for a process that holds a model: the current value plus
    ``glibc.malloc.hugetlb=1`` (glibc >= 2.35 then asks for transparent huge pages on the
    memory it maps; older ones ignore it), unless ``STRATA_HUGE_PAGES=0``. Read at a
    process's start, so it is set before an engine process is spawned.

    NOTE: oneDNN's packed weights are allocated by malloc, out of strata's reach; on huge
    pages a bf16 decode step ran 6-8% faster here (batch 1: 12.5-12.9 vs 13.3-13.9 ms;
    batch 16: 17.7-18.3 vs 19.4-19.9 ms)."""
    current = system_env("GLIBC_TUNABLES", "") or ""
    if env("HUGE_PAGES", "1") == "0" or "glibc.malloc.hugetlb" in current:
        return current
    return f"{current}:glibc.malloc.hugetlb=1" if current else "glibc.malloc.hugetlb=1"


def omp_spin_count() -> str | None:
    """``GOMP_SPINCOUNT`` for an engine process: 20000, unless ``GOMP_SPINCOUNT`` or
    ``OMP_WAIT_POLICY`` is set (then None: theirs stands).

    NOTE: with libgomp's default (300000 spins) the step's other thread stays busy through
    the step loop's Python between forwards, and the front's work then preempts a thread
    that has work; at 20000 it sleeps there. Through `strata serve`, int4 batch 1: 3.52-3.54
    against 3.65-3.68 ms a token (5000: 3.66-3.68, wake-ups; 100000: 3.56-3.64); bf16 the
    same (9.0-9.2 ms); 16 conversations' multi-turn within noise (678-692 against 687-702
    tok/s). A plain in-process loop pays for it: 3.27-3.30 against 3.17-3.20 ms."""
    if system_env("GOMP_SPINCOUNT") or system_env("OMP_WAIT_POLICY"):
        return None
    return "20000"


def engine_environment() -> dict[str, str]:
    """What an engine process's environment adds (read at its start, so set before it is
    spawned): `huge_page_malloc`'s ``GLIBC_TUNABLES`` and `omp_spin_count`'s
    ``GOMP_SPINCOUNT``."""
    out = {"GLIBC_TUNABLES": huge_page_malloc()}
    spin = omp_spin_count()
    if spin is not None:
        out["GOMP_SPINCOUNT"] = spin
    return out


def cache_dir() -> Path:
    """Where converted weights and tokenizers are kept (``STRATA_CACHE_DIR`` overrides)."""
    explicit = env("CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = system_env("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "strata"


# CPU ISA levels of the C kernels, lowest first (strata/kernels/cpu/build.py builds one
# library per level): "none" is portable C (the compiler's default target: SSE2 on x86-64,
# NEON on aarch64), "avx2" x86-64-v3 (AVX2, FMA, F16C), "avx512" x86-64-v4 with AVX512-BF16,
# "amx" that with AMX tiles (bf16).
CPU_ISAS = ("none", "avx2", "avx512", "amx")
_ISA_NEEDS = {
    "avx2": {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"},
    "avx512": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_bf16"},
    "amx": {"amx_tile", "amx_bf16"},
}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def detected_cpu_isa() -> str:
    """The highest level of CPU_ISAS this CPU runs: its /proc/cpuinfo flags (each level
    needs the flags of those below it too); "none" off x86-64 or where they cannot be read."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "none"
    flags, best, needed = _cpu_flags(), "none", set()
    for level in CPU_ISAS[1:]:
        needed |= _ISA_NEEDS[level]
        if not needed <= flags:
            break
        best = level
    return best


def cpu_isa() -> str:
    """The ISA level the C kernels run at: the detected one, or ``STRATA_CPU_ISA`` where it
    names a lower level (to test or time a lower level's kernels). A level above what the CPU
    runs is refused, never run (it would die of SIGILL)."""
    best = detected_cpu_isa()
    forced = env("CPU_ISA")
    if not forced:
        return best
    if forced not in CPU_ISAS:
        raise ValueError(f"STRATA_CPU_ISA={forced!r}: choose one of {', '.join(CPU_ISAS)}")
    if CPU_ISAS.index(forced) > CPU_ISAS.index(best):
        raise ValueError(f"STRATA_CPU_ISA={forced}: this CPU runs at most {best}")
    return forced


def dtype_name(name: str, device: str) -> str:
    """``auto`` is bfloat16 on CUDA and on CPUs whose kernels run bfloat16 (AVX2 and up: the
    kernels widen it to float32 and accumulate in float32, which the oracle test allows), and
    float32 on the portable level, where bfloat16 would run on torch's slower paths."""
    if name == "auto":
        return "bfloat16" if device.startswith("cuda") or cpu_isa() != "none" else "float32"
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto or one of {sorted(DTYPES)}")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """The torch dtype of dtype_name(name, device)."""
    import torch

    return getattr(torch, dtype_name(name, device))


# NOTE: measured on the embedded model over English text (bench/sparse_quality.py): a cutoff
# of 1.2 nats (ln 0.3 itself) skipped 90% of the pages at 4k tokens with a mean KL of 0.15
# from dense; 6 nats skipped 67% (KL 0.006) but lost 2 of 5 pass keys at 2k that dense found.
# 7 nats kept every pass key until the bfloat16 norm became bit-equal to torch's, then lost
# one (a digit at 2k); 8 nats keeps every pass key at 2k and 4k, and with the default budget
# (40% of the pages) on top skips 61% at 4k (KL 0.004) and 64% at 2k.
SPARSE_SPREAD = 6.7  # the default 0.3 -> an 8.1-nat cutoff


@dataclass(frozen=True)
class SparseConfig:
    """Sparse attention in decode (the rule: attention.reference.select_pages; docs/sparse.md
    explains the flags)."""

    threshold: float = 0.3  # skip a page whose bound on its softmax weight, over the best
    # page's and taken to the power 1 / SPARSE_SPREAD, is below this (per step, layer and KV
    # head); 0 turns sparse attention off
    min_context: int = 1024  # tokens: shorter sequences attend densely
    budget: float = 0.4  # pages kept at most: a count if >= 1, a fraction if < 1; 0: no cap
    dense_layers: int = 2  # the first layers stay dense (they attend broadly, as Quest found)
    sink_pages: int = 1  # always kept: the first pages
    window_pages: int = 4  # always kept: the last pages (the newest token's page included)
    # fetch on select (with KV tiers, CPU): a running request's page that no sparse layer
    # and KV head kept for this many decode steps may move to L2 when L1 runs short; 0: never
    demote_after: int = 8

    def __post_init__(self) -> None:
        if not 0 <= self.threshold < 1:
            raise ValueError("--attention-sparsity-threshold must be in [0, 1)")
        if self.budget < 0 or (self.budget >= 1 and self.budget != int(self.budget)):
            raise ValueError("--sparse-budget must be a page count (>= 1) or a fraction (< 1)")
        if (
            self.min_context < 0
            or self.dense_layers < 0
            or self.sink_pages < 0
            or self.demote_after < 0
        ):
            raise ValueError(
                "--sparse-min-context, --sparse-dense-layers and "
                "--sparse-demote-after must not be negative"
            )
        if self.window_pages < 1:
            raise ValueError("sparse attention keeps at least the newest page")

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    @property
    def min_score(self) -> float:
        """The cutoff select_pages applies to a page's score (its bound on the attention
        logit minus the best page's, in nats): SPARSE_SPREAD * ln(threshold), so the default
        0.3 skips pages whose bound is more than 8.1 nats under the best page's."""
        return SPARSE_SPREAD * math.log(self.threshold) if self.threshold > 0 else -math.inf


def default_sparse(device: str) -> SparseConfig:
    """Sparse decode on a device unless told otherwise: SparseConfig() on CPU; off on CUDA,
    where page selection runs as eager torch ops and no CUDA graph replays the step (an
    H200 run measured 54-77 ms a decode step at 2000 tokens, against 11-12 dense eager and
    1.9-6.9 dense in graphs: docs/gpu.md)."""
    return SparseConfig(threshold=0) if device.startswith("cuda") else SparseConfig()


# The attention backends by name, each the class that implements it (strata.attention.base
# says how to write one; strata.attention.registry imports it when asked). auto: triton on
# CUDA, cpu on CPU; torch: the reference ops (gather + SDPA) everywhere; cpu: the C kernels
# (strata/kernels/cpu) where they build, else torch's; triton: the Triton kernels (CUDA, or
# CPU tensors under TRITON_INTERPRET=1, for tests)
ATTENTION_BACKENDS = {
    "auto": "",
    "torch": "strata.attention.torch_backend:TorchAttention",
    "cpu": "strata.attention.cpu_backend:CpuAttention",
    "triton": "strata.attention.triton_backend:TritonAttention",
}


@dataclass(frozen=True)
class ModelConfig:
    model_path: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "auto"
    device: str = "cpu"
    # "int4": group-wise weight-only int4 linear layers (a GGUF file's Q4_1 blocks as they
    # are); "auto": int4 where the model is a GGUF file with Q4_1 blocks (the embedded model)
    # and strata's int4 kernels run (CPU, AVX2 and up, one rank), else "none"
    quantization: str = "auto"
    sparse: SparseConfig | None = None  # None: the device's default (sparse_attention)
    context_length: int | None = None  # caps the model's own (max_position_embeddings)
    attention_backend: str = "auto"  # see ATTENTION_BACKENDS
    tp_size: int = 1  # tensor-parallel ranks (strata.model.tp)
    # CUDA: decode batches of up to this many sequences replay captured graphs (0: never)
    cuda_graph_max_bs: int = 64

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"unknown quantization {self.quantization!r}; choose one of {QUANTIZATIONS}"
            )
        if self.tp_size < 1:
            raise ValueError("--tp-size must be at least 1")
        if self.cuda_graph_max_bs < 0:
            raise ValueError("--cuda-graph-max-bs must be >= 0")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention backend {self.attention_backend!r}; "
                f"choose one of {tuple(ATTENTION_BACKENDS)}"
            )
        dtype_name(self.dtype, self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.device)

    @property
    def sparse_attention(self) -> SparseConfig:
        """`sparse`, or the device's default (default_sparse)."""
        return self.sparse if self.sparse is not None else default_sparse(self.device)


@dataclass(frozen=True)
class KVPoolConfig:
    """The device KV pool (L1): pages of page_size tokens, every layer's K and V. Sized from
    a memory budget (strata/engine/memory.py) unless num_pages is given."""

    page_size: int = 16
    num_pages: int | None = None  # an explicit L1 size: overrides the budget
    # SGLang's --mem-fraction-static: the budget is this fraction of the memory available at
    # start (host RAM on CPU, with the cgroup's limit; the GPU's memory on CUDA); None: the
    # device's default (memory.CPU_MEM_FRACTION, memory.CUDA_MEM_FRACTION)
    mem_fraction: float | None = None
    memory_budget_gb: float | None = None  # an explicit budget (strata up hands one out)

    def __post_init__(self) -> None:
        if self.page_size <= 0 or (self.num_pages is not None and self.num_pages <= 0):
            raise ValueError("page_size and num_pages must be positive")
        if self.mem_fraction is not None and not 0 < self.mem_fraction < 1:
            raise ValueError("--mem-fraction-static must be in (0, 1)")
        if self.memory_budget_gb is not None and self.memory_budget_gb <= 0:
            raise ValueError("--memory-budget-gb must be positive")


WRITE_POLICIES = ("write_through", "write_through_selective", "write_back")
PREFETCH_POLICIES = ("best_effort", "wait_complete", "timeout")


@dataclass(frozen=True)
class HiCacheConfig:
    """The KV tiers below L1 (SGLang's flags): L2 host memory and the L3 page store."""

    enabled: bool = False
    ratio: float = 2.0  # L2 pages per L1 page
    size_gb: float = 0.0  # L2 size; overrides ratio when > 0
    write_policy: str = "write_through"
    storage_backend: str = ""  # "" (no L3), "file" or "redis"
    storage_dir: str | None = None  # file: the directory
    storage_url: str | None = None  # redis: redis://[:password@]host:port/db (or rediss://)
    storage_size_gb: float = 16.0  # L3 budget: least recently used files are deleted past it
    prefetch_policy: str = "timeout"
    # timeout policy: wait for L3 pages at most base + per_k_tokens * prompt_k_tokens, capped
    prefetch_timeout_base: float = 2.0
    prefetch_timeout_per_k_tokens: float = 0.1
    prefetch_timeout_max: float = 30.0

    def __post_init__(self) -> None:
        if self.write_policy not in WRITE_POLICIES:
            raise ValueError(f"--hicache-write-policy must be one of {WRITE_POLICIES}")
        if self.prefetch_policy not in PREFETCH_POLICIES:
            raise ValueError(
                f"--hicache-storage-prefetch-policy must be one of {PREFETCH_POLICIES}"
            )
        if self.storage_backend not in ("", "file", "redis"):
            raise ValueError("--hicache-storage-backend must be 'file' or 'redis' (or unset)")
        if self.storage_backend and not self.enabled:
            raise ValueError("--hicache-storage-backend needs --enable-hierarchical-cache")
        if self.storage_backend == "file" and not self.storage_dir:
            raise ValueError("--hicache-storage-backend file needs --hicache-storage-dir")
        if self.storage_backend == "redis" and not (self.storage_url or "").startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError(
                "--hicache-storage-backend redis needs --hicache-storage-url "
                "redis://[:password@]host:port/db (rediss:// for TLS)"
            )
        if self.ratio <= 0 or self.size_gb < 0 or self.storage_size_gb <= 0:
            raise ValueError("--hicache-ratio and --hicache-storage-size must be positive")

    def host_pages(self, l1_pages: int, bytes_per_page: int) -> int:
        if self.size_gb > 0:
            return max(1, int(self.size_gb * 1e9 // bytes_per_page))
        return max(1, int(l1_pages * self.ratio))

    def prefetch_timeout(self, prompt_tokens: int) -> float:
        """Seconds a request waits for its L3 pages (0: do not wait; inf: until done)."""
        if self.prefetch_policy == "best_effort":
            return 0.0
        if self.prefetch_policy == "wait_complete":
            return float("inf")
        t = self.prefetch_timeout_base + self.prefetch_timeout_per_k_tokens * prompt_tokens / 1000
        return min(t, self.prefetch_timeout_max)


@dataclass(frozen=True)
class SchedulerConfig:
    enable_radix_cache: bool = True
    max_running_requests: int = 64
    max_batch_tokens: int = 512  # per step: decode tokens plus prefill chunks
    max_queued_requests: int = 1024  # past running + this many, new requests are refused
    request_timeout: float = 0.0  # seconds a request may take from arrival; 0: no limit
    schedule_policy: str = "lpm"  # lpm: longest cached prefix first; fcfs: arrival order
    speculative_algorithm: str = "ngram"  # ngram: greedy requests verify n-gram drafts
    speculative_num_draft_tokens: int = 4  # tokens per draft
    session_pages_fraction: float = 0.5  # of the L1 pool, what open sessions may pin

    def __post_init__(self) -> None:
        if not 0 <= self.session_pages_fraction <= 0.95:
            raise ValueError("--session-pages-fraction must be in [0, 0.95]")
        if self.speculative_algorithm not in ("none", "ngram"):
            raise ValueError("--speculative-algorithm must be none or ngram")
        if not 1 <= self.speculative_num_draft_tokens <= 16:
            raise ValueError("--speculative-num-draft-tokens must be in [1, 16]")
        if self.max_running_requests < 1 or self.max_batch_tokens < 1:
            raise ValueError("max_running_requests and max_batch_tokens must be positive")
        if self.schedule_policy not in ("lpm", "fcfs"):
            raise ValueError("--schedule-policy must be lpm or fcfs")
        if self.max_queued_requests < 0 or self.request_timeout < 0:
            raise ValueError("--max-queued-requests and --request-timeout must not be negative")

    @property
    def draft_tokens(self) -> int:
        """Tokens per n-gram draft (0: no speculation)."""
        return self.speculative_num_draft_tokens if self.speculative_algorithm == "ngram" else 0


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 30000
    served_model_name: str | None = None
    log_level: str = "info"
    grpc_port: int = 0  # the gRPC Gateway: 0 = port + 1, -1 = off
    api_key: str | None = None  # REST and gRPC callers must present it (Bearer)
    protect_health: bool = False  # /health, /metrics and gRPC health need the key too
    tool_call_parser: str = "json"  # the chat API's tool format (gateway/tool_formats.py)
