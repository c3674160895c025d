"""Building and loading strata's native code: C (and C++) sources beside the package, built
with the system compiler into the cache dir and loaded with ctypes. `library()` is the CPU
kernels of cpu_decode.c and cpu_ops.c (sharing cpu_common.h) with their argument types;
strata/kernels/cpu/attention.py wraps them for torch tensors.

The kernels are built once per ISA level (config.CPU_ISAS: portable C, AVX2, AVX-512, AMX),
each with that level's target flags and never `-march=native`, and the level loaded is the
highest the CPU runs (config.cpu_isa; ``STRATA_CPU_ISA`` forces a lower one). A build is
cached under a key of its sources, flags, level and compiler version, not of the machine: a
cache dir (or an image) made on one CPU runs on any other, each loading its own level.

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
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch  # noqa: F401  (first: its OpenMP runtime is the one the kernels bind to)

from strata.config import CPU_ISAS, cache_dir, cpu_isa, env, system_env

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
# attention (paged decode, KV write, selection, ...), the other layer ops, the AVX2 linear
# layers; one library
SOURCES = (HERE / "cpu_decode.c", HERE / "cpu_ops.c", HERE / "cpu_gemm.c")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_X86 = platform.machine().lower() in ("x86_64", "amd64")
# NOTE: GCC's default vector width is 256 bits even with AVX-512; the AVX-512 code asks for 512
_AVX512 = ["-march=x86-64-v4", "-mavx512bf16", "-mprefer-vector-width=512"]
ISA_FLAGS: dict[str, list[str]] = {
    "none": [],  # the compiler's default target: portable C (SSE2 on x86-64, NEON on aarch64)
    "avx2": ["-march=x86-64-v3", "-mtune=generic"],  # AVX2, FMA, F16C, BMI2
    "avx512": _AVX512,
    "amx": [*_AVX512, "-mamx-tile", "-mamx-bf16"],
}


def enabled() -> bool:
    return env("CPU_KERNELS", "1") != "0"


@functools.cache
def compiler_version(cc: str) -> str:
    """The first line of `cc --version` (part of a build's key: another compiler, another
    build)."""
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return cc
    return (out.stdout.splitlines() or [cc])[0]


def build(
    compiler: str | None = None,
    sources: Sequence[Path] = SOURCES,
    flags: Sequence[str] = FLAGS,
    libs: Sequence[str] = ("-lm",),
    isa: str = "none",
) -> Path:
    """Compile sources beside this package into one shared library for an ISA level (by
    default the kernels, portable; once per sources, the headers beside them, flags, level
    and compiler) and return it."""
    cc = compiler or system_env("CC") or "gcc"
    flags = [*flags, *ISA_FLAGS[isa]] if _X86 else list(flags)
    headers = sorted(sources[0].parent.glob("*.h"))
    key = hashlib.sha256(
        b"".join(p.read_bytes() for p in (*sources, *headers))
        + " ".join([cc, compiler_version(cc), *flags, *libs]).encode()
    ).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"{sources[0].stem}-{isa}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        objects: list[str | Path] = list(sources)
        if len(sources) > 1:  # each source on its own core, then one link
            compile_flags = [f for f in flags if f != "-shared"]
            objects = [Path(tmp) / f"{i}-{src.stem}.o" for i, src in enumerate(sources)]
            cmds = [
                [cc, *compile_flags, "-c", str(src), "-o", str(obj)]
                for src, obj in zip(sources, objects, strict=True)
            ]
            with ThreadPoolExecutor(min(len(cmds), os.cpu_count() or 1)) as pool:
                list(pool.map(_run, cmds))  # list: the first failure raises here
        _run([cc, *flags, *map(str, objects), "-o", str(built), *libs])
        os.replace(built, out)  # atomic: processes building at once all end with one file
    return out


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")


def levels() -> tuple[str, ...]:
    """The ISA levels this machine builds for: every x86-64 level (a cache or an image then
    serves any x86-64 CPU), only the portable one elsewhere."""
    return CPU_ISAS if _X86 else ("none",)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernels at cpu_isa()'s level (None: disabled, or no compiler)."""
    if not enabled():
        return None
    isa = cpu_isa()
    try:
        lib = ctypes.CDLL(str(build(isa=isa)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("CPU kernels unavailable, using the torch reference ops: %s", e)
        return None
    log.debug("CPU kernels at ISA level %s", isa)
    _declare(lib)
    return lib


def reset() -> None:
    """Forget the loaded kernels, so the next library() loads cpu_isa()'s level afresh (for
    tests that force a level; the models built before keep what they chose at load)."""
    library.cache_clear()
    for name in ("strata.kernels.cpu.ops", "strata.model.cpu_layers"):
        module = sys.modules.get(name)
        if module is not None:
            module.reset()


# Every C entry point and its arguments, one letter each: i int, l int64, p a pointer (int64
# arrays included), f float, d double. Each returns an int (0: done; else: use the reference).
SIGNATURES = {
    "paged_decode": "i p p p p p p i i i i i i l f i i i l",
    "paged_decode_capped": "i p p p p p p i i i i i i l f i i i l f l",
    "write_kv": "i p p p p p p l i i i l l",
    "paged_prefill": "i p l p p p p p p p i i i i i i l f",
    "paged_prefill_capped": "i p l p p p p p p p i i i i i i l f f l",
    "shared_decode_available": "",
    "select_pages": "i p p p p p p i i i i i i l f f l d i i p p p l l l p p p p",
    "sparse_decode": "i p p p p p p p p p i i i i i i l f f l d i i p p p l l l i p p",
    "add_rms_norm": "p p p p l i f",
    "rope_bf16": "p l i i l p p",
    "silu_mul_bf16": "p p l l",
    "gemv_packed_bf16": "p p p p l l l",
    "amx_linear_bf16": "p p p p l l l",
    "linear_packed_bf16": "p p p p l l l",
    "int4_linear_bf16": "p p p p l l l l",
    "linear_avx2": "i p p i p p l l l",
    "write_decode": "i p p p p p p l p p p p i i i i i i l f i i l l",
    "moe_avx2": "i p l l p p p i p p i p",
}
_CTYPES = {
    "i": ctypes.c_int,
    "l": ctypes.c_int64,
    "p": ctypes.c_void_p,
    "f": ctypes.c_float,
    "d": ctypes.c_double,
}


def _declare(lib: ctypes.CDLL) -> None:
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = [_CTYPES[a] for a in args.split()]
        fn.restype = ctypes.c_int


def main() -> int:
    """`python -m strata.kernels.cpu.build`: build the kernels at every level this machine
    builds for (an image made so runs on any CPU of its architecture)."""
    for isa in levels():
        print(isa, build(isa=isa))
    return 0


if __name__ == "__main__":
    sys.exit(main())
