"""Sizing the KV tiers from the memory a worker may hold.

On CPU the weights, the runtime and both KV tiers below the disk (L1, and L2 where
hierarchical caching is on) share host memory, so one budget covers them all: by default
`--mem-fraction-static` of the memory available when the process starts (MemAvailable, and
the room left under a cgroup's memory limit where the process has one), or an explicit
`--memory-budget-gb` (which `strata up` hands each worker it starts: its share of one budget
for the host). The KV tiers get what the process holds after loading leaves, less a reserve
for a step's activations. On CUDA the budget is that fraction of the device's memory, and
the weights are what it holds. `--num-pages` overrides the sizing (L2 is then sized from it
by `--hicache-ratio` / `--hicache-size`, as ever).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GB = 1e9
# NOTE: the share of host memory a CPU worker takes by default: the rest is left to the OS,
# the front processes (gateway, cache service) and whatever else the machine runs.
CPU_MEM_FRACTION = 0.7
CUDA_MEM_FRACTION = 0.85
# bytes kept free of the KV tiers for a step's activations and allocator slack: a 512-token
# prefill chunk of the embedded model peaks ~60 MB above the resident weights (measured)
RESERVE_BYTES = 256 * 1024 * 1024
# the smallest L1 pool a worker starts with: one request of this many tokens (or of the
# context, if shorter) must fit
MIN_POOL_TOKENS = 4096


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_dirs() -> list[Path]:
    """The memory cgroup folders of this process and its ancestors (v2 unified, or v1's
    memory controller)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    dirs = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            root = Path("/sys/fs/cgroup")
        elif "memory" in controllers.split(","):
            root = Path("/sys/fs/cgroup/memory")
        else:
            continue
        here = root / path.lstrip("/")
        while True:
            dirs.append(here)
            if here == root:
                break
            here = here.parent
    return dirs


def cgroup_room() -> int | None:
    """Bytes left under the tightest memory cgroup limit above this process (its limit less
    its working set: usage without inactive file pages), None where there is no limit."""
    room = None
    for d in _cgroup_dirs():
        limit = _read_int(d / "memory.max") or _read_int(d / "memory.limit_in_bytes")
        if limit is None or limit >= 1 << 60:
            continue
        usage = _read_int(d / "memory.current") or _read_int(d / "memory.usage_in_bytes") or 0
        inactive = 0
        try:
            for line in (d / "memory.stat").read_text().splitlines():
                name, _, value = line.partition(" ")
                if name in ("inactive_file", "total_inactive_file"):
                    inactive = int(value)
        except (OSError, ValueError):
            pass
        left = max(0, limit - max(0, usage - inactive))
        room = left if room is None else min(room, left)
    return room


def available_memory() -> int:
    """Bytes of host memory this process could take now: MemAvailable, capped by the room
    under its cgroup's memory limit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    avail = _meminfo("MemAvailable") or total
    room = cgroup_room()
    return min(avail, room) if room is not None else avail


def resident_bytes() -> int:
    """This process's resident set (RSS), in bytes."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class MemoryPlan:
    """The sizes chosen at start (reported by /health and /get_server_info)."""

    budget_bytes: int  # what the worker may hold: weights, runtime, KV tiers
    resident_bytes: int  # held before the KV tiers (runtime and weights; CUDA: weights)
    weight_bytes: int
    page_bytes: int  # one KV page, every layer's K and V
    l1_pages: int
    l2_pages: int  # host tier (0: none)
    sized_by: str  # "budget" or "num_pages"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_pages(
    budget: int,
    resident: int,
    page_bytes: int,
    min_pages: int,
    host_pages: Callable[[int], int] | None,
    weight_bytes: int,
) -> MemoryPlan:
    """The most L1 pages that, with host_pages(L1) L2 pages beside them (None: no L2 in this
    budget), fit what the budget leaves after the resident bytes and RESERVE_BYTES. Raises
    ValueError naming the numbers when fewer than min_pages fit."""
    room = budget - resident - RESERVE_BYTES

    def fits(n: int) -> bool:
        return (n + (host_pages(n) if host_pages else 0)) * page_bytes <= room

    lo, hi = 0, max(0, room // page_bytes)
    while lo < hi:  # the largest n that fits (host_pages grows with n)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    if lo < min_pages:
        need = (
            resident
            + RESERVE_BYTES
            + min_pages
            * page_bytes
            * (1 + (host_pages(min_pages) / min_pages if host_pages else 0))
        )
        raise ValueError(
            f"a memory budget of {budget / GB:.2f} GB cannot hold this worker: "
            f"{resident / GB:.2f} GB resident after loading (weights {weight_bytes / GB:.2f} "
            f"GB), {RESERVE_BYTES / GB:.2f} GB reserved for activations, and a minimum KV "
            f"pool of {min_pages} pages of {page_bytes / 1e3:.1f} KB"
            f"{' with its L2 share' if host_pages else ''} ({need / GB:.2f} GB in all). Give "
            "it more (--mem-fraction-static, --memory-budget-gb, a smaller --hicache-ratio) "
            "or set --num-pages"
        )
    return MemoryPlan(
        budget,
        resident,
        weight_bytes,
        page_bytes,
        lo,
        host_pages(lo) if host_pages else 0,
        "budget",
    )


def device_budget(device: str, fraction: float | None, explicit_gb: float | None) -> int:
    """The bytes a worker on `device` may hold: explicit_gb, else fraction (or the device's
    default) of the memory available now (CUDA: of the GPU's memory)."""
    if explicit_gb:
        return int(explicit_gb * GB)
    if device.startswith("cuda"):
        import torch  # here only: `strata up` sizes its workers without it

        total = int(torch.cuda.mem_get_info(torch.device(device))[1])
        return int((fraction or CUDA_MEM_FRACTION) * total)
    return int((fraction or CPU_MEM_FRACTION) * available_memory())


# NOTE: what a local cluster's processes without a model hold: `strata up` itself, the cache
# service and the gateway (~0.26, ~0.26 and ~0.46 GB RSS measured on the embedded model)
FRONT_BYTES = int(1.25 * GB)


def worker_share(
    device: str, fraction: float | None, explicit_gb: float | None, workers: int
) -> int:
    """Each of `workers` model workers' share of one budget for this host (what
    device_budget gives, measured once): on CPU after FRONT_BYTES for the processes without
    a model; evenly."""
    total = device_budget(device, fraction, explicit_gb)
    if not device.startswith("cuda"):
        total -= FRONT_BYTES
    return max(0, total) // max(1, workers)
