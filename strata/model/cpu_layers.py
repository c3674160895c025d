"""The decoder layers of a dense decode-only batch as one C++ call (cpu_layers.cpp): CPU,
bfloat16 activations, int4 or bfloat16 (oneDNN-packed) weights, one rank. The same ops in
the same order as the Python layers (strata/model/layers.py), so the same bits, without
~300 Python-level calls a step.

Built once with the system C++ compiler against the installed torch (ATen for its int4
product where strata's int4 kernels can't run, its dispatcher for oneDNN's linear) into the
cache dir, beside
strata's C kernels (cpu_decode.c, cpu_ops.c), whose functions it calls. Anything unusual
(another dtype, tensor parallelism, sparse or mixed batches, weights oneDNN did not pack,
no compiler, ``STRATA_CPU_KERNELS=0``) keeps the Python layers.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import subprocess
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.utils.cpp_extension as cpp

from strata.attention.base import AttentionBackend
from strata.config import system_env
from strata.kernels.cpu import attention as cpu_kernels
from strata.kernels.cpu import build as cpu_build
from strata.kernels.cpu import ops as cpu_ops
from strata.kv.pool import KVCache
from strata.model.linear import Int4Linear, Linear
from strata.model.spec import ModelSpec

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_layers.cpp")


class Fusable(Protocol):
    """What the fused layers read of a model (decoder.DecoderLM has it)."""

    local: ModelSpec  # this rank's shape
    backend: AttentionBackend  # its attention backend (its `scale`)
    layers: list[Any]  # decoder layers: attn.qkv / o_proj, mlp.gate_up / down, norm1 / 2
    embed_tokens: torch.Tensor  # [vocab, hidden]: its device and dtype
    tp: Any  # None on one rank


def reset() -> None:
    """Forget the loaded library (cpu_build.reset: the kernels it calls may change)."""
    library.cache_clear()


@functools.cache
def library() -> ctypes.CDLL | None:
    if cpu_build.library() is None:
        return None
    flags = [
        "-O2",
        "-std=c++20",
        "-shared",
        "-fPIC",
        "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-DSTRATA_TORCH={torch.__version__}",
        *(f"-I{p}" for p in cpp.include_paths()),
    ]
    lib_dir = cpp.library_paths()[0]
    libs = [f"-L{lib_dir}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib_dir}"]
    cxx = system_env("CXX") or "g++"
    try:
        lib = ctypes.CDLL(str(cpu_build.build(cxx, (SOURCE,), flags, libs)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("fused CPU decode layers unavailable, using the Python layers: %s", e)
        return None
    p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.model_new.argtypes = [i, i, i, i, f, f, p, p, p, p, p, i, p, p]
    lib.model_new.restype = p
    lib.model_free.argtypes = [p]
    lib.model_add_layer.argtypes = [p, p, p, p]
    lib.model_add_layer.restype = i
    lib.model_decode.argtypes = [p, p, p, i64, p, p, p, p, p, p, i, i, i, p, i, i64]
    lib.model_decode.restype = i
    return lib


def _address(fn: Any) -> int:
    """A C function's address (a ctypes function of a loaded library), for the C++ side."""
    return ctypes.cast(fn, ctypes.c_void_p).value or 0


class CpuLayers:
    """Holds the C++ model (pointers into the Python model's weights, which outlive it)."""

    def __init__(self, lib: ctypes.CDLL, model: Fusable) -> None:
        spec, kernels = model.local, cpu_build.library()
        assert kernels is not None
        self.lib, self.scale = lib, model.backend.scale
        self.handle = lib.model_new(
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            spec.hidden_size,
            spec.rms_norm_eps,
            self.scale,
            _address(kernels.add_rms_norm),
            _address(kernels.rope_bf16),
            _address(kernels.write_decode),
            _address(kernels.silu_mul_bf16),
            _address(kernels.linear_packed_bf16),
            cpu_ops.PACKED_ROWS,
            _address(kernels.int4_linear_bf16),
            _address(kernels.linear_avx2),
        )
        self.hidden = spec.hidden_size
        for layer in model.layers:
            linears = []
            for lin in (layer.attn.qkv, layer.attn.o_proj, layer.mlp.gate_up, layer.mlp.down):
                bias = lin.bias.data_ptr() if lin.bias is not None else 0
                if isinstance(lin, Int4Linear):  # cpu_layers.cpp's Kind: 2 strata's, 1 ATen's
                    sz = lin.scales_and_zeros.data_ptr() if lin.scales_and_zeros is not None else 0
                    linears += [
                        2 if lin.strata else 1,
                        lin.packed.data_ptr(),
                        lin.out_features,
                        lin.in_features,
                        lin.group_size,
                        sz,
                        bias,
                    ]
                elif not isinstance(lin, Linear):
                    raise TypeError(f"cpu_layers: no kind for {type(lin).__name__}")
                elif lin.pairs is not None:  # 3: strata's bfloat16 pairs (AVX2)
                    out_f, in_f = lin.weight.shape
                    linears += [3, lin.pairs.data_ptr(), out_f, in_f, 0, 0, bias]
                else:  # 0: oneDNN's packed bf16 weight, shared with C++ by its TensorImpl
                    assert lin.packed
                    out_f, in_f = lin.weight.shape
                    linears += [0, lin.weight._cdata, out_f, in_f, 0, lin.address, bias]
            arr = (ctypes.c_int64 * len(linears))(*linears)
            rc = lib.model_add_layer(
                self.handle, arr, layer.norm1.weight.data_ptr(), layer.norm2.weight.data_ptr()
            )
            if rc:
                raise RuntimeError("cpu_layers: a layer was refused")
        self._kv: tuple[int, torch.Tensor] | None = None  # (pool address, K/V pointers)
        self.calls = 0  # forwards it ran

    @classmethod
    def of(cls, model: Fusable) -> CpuLayers | None:
        """The fused layers for `model`, or None where they do not apply."""
        emb = model.embed_tokens
        if model.tp is not None or emb.device.type != "cpu" or emb.dtype != torch.bfloat16:
            return None
        for layer in model.layers:
            for lin in (layer.attn.qkv, layer.attn.o_proj, layer.mlp.gate_up, layer.mlp.down):
                if isinstance(lin, Linear) and not lin.packed and lin.pairs is None:
                    return None  # bf16 weights neither oneDNN nor the AVX2 kernel took
        lib = library()
        return cls(lib, model) if lib is not None else None

    def close(self) -> None:
        if self.handle:
            self.lib.model_free(self.handle)
            self.handle = None

    def __del__(self) -> None:
        # at interpreter shutdown the library may be gone already
        with contextlib.suppress(AttributeError, TypeError):
            self.close()

    def _pointers(self, kv: KVCache) -> torch.Tensor:
        """Each layer's K and V of page 0 (kept per pool)."""
        at = kv.data.data_ptr()
        if self._kv is None or self._kv[0] != at:
            ptrs = [p for layer in kv.layers for p in (layer.k.data_ptr(), layer.v.data_ptr())]
            self._kv = (at, torch.tensor(ptrs, dtype=torch.int64))
        return self._kv[1]

    def run(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: cpu_kernels.DecodePlan,
        kv: KVCache,
    ) -> torch.Tensor | None:
        """Every layer over x [rows, hidden] (updated in place: the residual stream); returns
        the last layer's MLP output, or None (x untouched) where the call does not apply."""
        rows, d = x.shape[0], cos.shape[-1]
        layer = kv.layers[0]
        if x.dtype != torch.bfloat16 or layer.k.dtype != torch.bfloat16 or not x.is_contiguous():
            return None
        if cos.shape != (rows, 1, d) or not (cos.is_contiguous() and sin.is_contiguous()):
            return None
        if cos.dtype != torch.bfloat16 or sin.dtype != torch.bfloat16:
            return None
        out = torch.empty_like(x)
        rc = self.lib.model_decode(
            self.handle,
            x.data_ptr(),
            out.data_ptr(),
            rows,
            cos.data_ptr(),
            sin.data_ptr(),
            plan.pages.data_ptr(),
            plan.offsets.data_ptr(),
            plan.table.data_ptr(),
            plan.lens.data_ptr(),
            plan.table.shape[1],
            plan.splits,
            plan.shared,
            self._pointers(kv).data_ptr(),
            layer.k.shape[1],
            layer.k.stride(0),
        )
        if rc:
            raise RuntimeError(f"cpu_layers: decode failed ({rc})")
        self.calls += 1
        return out
