"""Building and loading strata's native code: C (and C++) sources beside the package, built
once with the system compiler into the cache dir (keyed by sources, flags and CPU) and
loaded with ctypes. `library()` is the CPU kernels of cpu_decode.c and cpu_ops.c (sharing
cpu_common.h) with their argument types; strata/attention/cpu_kernels.py wraps them for
torch tensors.

torch is imported first, so the kernels' OpenMP resolves to the runtime torch already loaded
and shares its threads. With no compiler, or with ``STRATA_CPU_KERNELS=0``, `library()` is
None and every caller uses the torch reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch  # noqa: F401  (first: its OpenMP runtime is the one the kernels bind to)

from strata.config import cache_dir, env, system_env

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
# attention (paged decode, KV write, selection, ...), then the other layer ops; one library
SOURCES = (HERE / "cpu_decode.c", HERE / "cpu_ops.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
if platform.machine() in ("x86_64", "AMD64"):
    FLAGS.append("-mprefer-vector-width=512")  # GCC's default is 256 bits even with AVX-512


def enabled() -> bool:
    return env("CPU_KERNELS", "1") != "0"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build(
    compiler: str | None = None,
    sources: Sequence[Path] = SOURCES,
    flags: Sequence[str] = FLAGS,
    libs: Sequence[str] = ("-lm",),
) -> Path:
    """Compile sources beside this package into one shared library (by default the kernels;
    once per sources, the headers beside them, flags and CPU) and return it."""
    cc = compiler or system_env("CC") or "gcc"
    headers = sorted(sources[0].parent.glob("*.h"))
    key = hashlib.sha256(
        b"".join(p.read_bytes() for p in (*sources, *headers))
        + " ".join([cc, *flags, *libs]).encode()
        + _cpu_flags().encode()
    ).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"{sources[0].stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        cmd = [cc, *flags, *map(str, sources), "-o", str(built), *libs]
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
    p, i = ctypes.c_void_p, ctypes.c_int
    i64p = p  # int64 arrays, passed by address
    i64 = ctypes.c_int64
    lib.paged_decode.argtypes = [
        i, p, p, p, p, i64p, i64p, i, i, i, i, i, i, i64, ctypes.c_float, i, i, i, i64
    ]  # fmt: skip
    lib.write_kv.argtypes = [i, p, p, p, p, i64p, i64p, i64, i, i, i, i64, i64]
    lib.paged_prefill.argtypes = [
        p, i64, p, p, p, i64p, i64p, i64p, i64p, i, i, i, i, i, i, i64, ctypes.c_float
    ]  # fmt: skip
    lib.shared_decode_available.argtypes = []
    lib.select_pages.argtypes = [
        i, p, p, p, i64p, i64p, p, i, i, i, i, i, i, i64, ctypes.c_float, ctypes.c_float, i64,
        ctypes.c_double, i, i, i64p, i64p, p, i64, i64, i64, i64p, i64p, i64p, p,
    ]  # fmt: skip
    lib.sparse_decode.argtypes = [
        i, p, p, p, p, p, p, i64p, i64p, p, i, i, i, i, i, i, i64, ctypes.c_float,
        ctypes.c_float, i64, ctypes.c_double, i, i, i64p, i64p, p, i64, i64, i64, i, i64p, p,
    ]  # fmt: skip
    lib.add_rms_norm.argtypes = [p, p, p, p, i64, i, ctypes.c_float]
    lib.rope_bf16.argtypes = [p, i64, i, i, i64, p, p]
    lib.silu_mul_bf16.argtypes = [p, p, i64, i64]
    lib.gemv_packed_bf16.argtypes = [p, p, p, p, i64, i64, i64]
    lib.amx_linear_bf16.argtypes = [p, p, p, p, i64, i64, i64]
    lib.linear_packed_bf16.argtypes = [p, p, p, p, i64, i64, i64]
    lib.int4_linear_bf16.argtypes = [p, p, p, p, i64, i64, i64, i64]
    lib.write_decode.argtypes = [
        i, p, p, p, p, i64p, i64p, i64, p, p, i64p, i64p, i, i, i, i, i, i, i64,
        ctypes.c_float, i, i, i64, i64,
    ]  # fmt: skip
    for fn in (lib.paged_decode, lib.paged_prefill, lib.write_kv, lib.select_pages,
               lib.sparse_decode, lib.add_rms_norm, lib.rope_bf16, lib.silu_mul_bf16,
               lib.write_decode, lib.gemv_packed_bf16, lib.amx_linear_bf16,
               lib.linear_packed_bf16, lib.int4_linear_bf16,
               lib.shared_decode_available):  # fmt: skip
        fn.restype = i
    return lib
