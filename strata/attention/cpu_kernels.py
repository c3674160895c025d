"""Hand-written CPU kernels: C sources beside this file, built once with the system C compiler
(`-O3 -march=native -fopenmp`) into the cache dir and loaded with ctypes.

torch is imported first, so the kernels' OpenMP resolves to the runtime torch already loaded
and shares its threads. With no compiler, or with ``STRATA_CPU_KERNELS=0``, every op here
returns None and the caller uses the torch reference (strata/attention/reference.py), which
is also the oracle the kernels are tested against.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from strata.config import cache_dir

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_decode.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# NOTE: a work item reads at least this many pages, so splitting a long context over the
# threads never costs more in merging than it saves.
MIN_PAGES_PER_SPLIT = 4


def enabled() -> bool:
    return os.environ.get("STRATA_CPU_KERNELS", "1") != "0"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build(compiler: str | None = None) -> Path:
    """Compile the kernels (once per source, flags and CPU) and return the shared library."""
    cc = compiler or os.environ.get("CC", "gcc")
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join([cc, *FLAGS]).encode() + _cpu_flags().encode()
    ).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"cpu_decode-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        cmd = [cc, *FLAGS, str(SOURCE), "-o", str(built), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
        os.replace(built, out)  # atomic: processes building at once all end with one file
    return out


@functools.cache
def library() -> ctypes.CDLL | None:
    if not enabled():
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("CPU kernels unavailable, using the torch reference ops: %s", e)
        return None
    p, i64p, i = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int
    lib.paged_decode.argtypes = [
        i, p, p, p, p, i64p, i64p, i, i, i, i, i, i, ctypes.c_int64, ctypes.c_float, i
    ]  # fmt: skip
    lib.paged_decode.restype = i
    return lib


def available(device: torch.device) -> bool:
    return device.type == "cpu" and library() is not None


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _page_contiguous(pages: torch.Tensor) -> bool:
    """Each page of [pages, page_size, kv_heads, D] one dense block (pages may be strided)."""
    _, _, h, d = pages.shape
    return pages.stride()[1:] == (h * d, d, 1)


def paged_decode(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor | None:
    """reference.paged_decode's contract, with lengths instead of a mask: q [batch, heads, D];
    k_pages, v_pages [pages, page_size, kv_heads, D]; page_table [batch, width]; seq_lens
    [batch]. None where the kernel does not apply (no library, dtype, device or shape)."""
    lib = library()
    dtype = DTYPES.get(q.dtype)
    if lib is None or dtype is None or q.device.type != "cpu" or k_pages.dtype != q.dtype:
        return None
    if k_pages.stride() != v_pages.stride() or not _page_contiguous(k_pages):
        return None
    b, heads, d = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    q = q.contiguous()
    # NOTE: no-ops for the backend, which prepares both once per forward, not per layer
    table = page_table.to(torch.int64).contiguous()
    lens = seq_lens.to(torch.int64).contiguous()
    want = -(-2 * torch.get_num_threads() // b)  # work items per sequence
    splits = max(1, min(want, table.shape[1] // MIN_PAGES_PER_SPLIT))
    out = torch.empty_like(q)
    i64p = ctypes.POINTER(ctypes.c_int64)
    rc = lib.paged_decode(
        dtype, _ptr(q), _ptr(k_pages), _ptr(v_pages), _ptr(out),
        ctypes.cast(table.data_ptr(), i64p), ctypes.cast(lens.data_ptr(), i64p),
        b, table.shape[1], heads, kv_heads, d, page_size, k_pages.stride(0), scale, splits,
    )  # fmt: skip
    return out if rc == 0 else None
