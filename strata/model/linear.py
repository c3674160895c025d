"""Linear layers: dense (weights prepacked for oneDNN on CPU), and weight-only group-wise
int4 for memory-bound decode on CPU."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from strata.config import cpu_isa
from strata.kernels.cpu import ops as cpu_ops

# NOTE: rows a decode step takes at a small cost a row on the AVX2 kernels (cpu_gemm.c): they
# are bound by operations, not by reading the weights, so past a few rows each costs about
# the first (embedded model, int4 + int8 head: 4.6 ms for 1 row, 10.4 for 4, 19.0 for 8),
# and n-gram drafts filling a step of 8 conversations to 16 rows made multi-turn slower (138
# against 163 out tok/s without speculation, AMD EPYC, 2026-12-07)
AVX2_STEP_ROWS = 4
# NOTE: the batch size oneDNN picks its weight layout for; measured on 2 cores, a layout
# packed for 32 rows is as fast as or faster than F.linear from 1 to 300 rows.
PACK_ROWS = 32


def can_prepack(weight: torch.Tensor) -> bool:
    """bfloat16 on CPU, where F.linear runs oneDNN anyway: packing changes no bit of the
    result. float32 stays on MKL's sgemm, as transformers does: oneDNN's float32 kernels
    sum in another order, which moved the embedded model's logits by 1.1e-4 (the oracle
    test allows 1e-4), although they were 2.4x faster."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


class Linear:
    """y = x W^T + b. A bfloat16 weight on CPU is reordered once into oneDNN's blocked
    layout, so no call repacks it: 1.3-1.8x faster linear layers in decode (2 cores). Up to
    PACKED_ROWS rows (a decode batch), strata's kernels read that packed weight directly
    (`address`), where its layout is the one they know."""

    # NOTE: rows a decode step's products take at a small cost a row (strata's AMX kernel;
    # embedded model, 2 cores: a step of 16 rows 12.6 ms, 32 rows 17.4, 64 rows 26.5)
    STEP_ROWS = 32

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.bias = bias
        self.packed = can_prepack(weight)
        self.out_features = weight.shape[0]
        # NOTE: where oneDNN has no bfloat16 kernels (AVX2 CPUs) F.linear in bfloat16 ran at
        # 7 GFLOP/s here; strata's AVX2 kernel reads the weight in pairs (cpu_gemm.c)
        self.pairs = pack_pairs(weight) if not self.packed and _pairs_apply(weight) else None
        if self.pairs is not None:
            self.STEP_ROWS = AVX2_STEP_ROWS
        if self.pairs is not None:  # the shape stays, the values live in the pairs alone
            weight = torch.empty(weight.shape, dtype=weight.dtype, device="meta")
        # [out, in]; an opaque MKLDNN tensor when packed
        self.weight = (
            torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS) if self.packed else weight
        )
        # the packed weight's address for cpu_ops.linear_packed (0: oneDNN for every call)
        self.address = _kernel_address(self.weight, weight, bias) if self.packed else 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.pairs is not None:
            return cpu_ops.linear_avx2(
                x, self.pairs, cpu_ops.W_PAIR_BF16, self.bias, self.out_features
            )
        if self.address:  # None past a decode batch's rows
            y = cpu_ops.linear_packed(x, self.address, self.bias, self.out_features)
            if y is not None:
                return y
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [None], "")
        return F.linear(x, self.weight, self.bias)


def _pairs_apply(weight: torch.Tensor) -> bool:
    out_f, in_f = weight.shape
    return (
        weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and out_f % 16 == 0
        and in_f % 32 == 0
        and cpu_ops.avx2_linear_available(torch.bfloat16)
    )


def _kernel_address(packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """The address of oneDNN's packed weight if linear_packed computes this layer from it:
    checked on two random rows against the plain weight (another layout, which oneDNN may
    pick on another CPU, gives garbage, not rounding), else 0."""
    out_f, in_f = weight.shape
    if out_f % 32 or in_f % 32:
        return 0
    try:
        if torch.ops.mkldnn._nbytes(packed) != out_f * in_f * 2:
            return 0
        address = int(torch.ops.mkldnn.data_ptr(packed))
    except (AttributeError, RuntimeError):
        return 0
    x = torch.randn(2, in_f, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    got = cpu_ops.linear_packed(x, address, bias, out_f)
    if got is None:
        return 0
    want = F.linear(x.float(), weight.float(), bias.float() if bias is not None else None)
    err = (got.float() - want).abs().max()
    return address if bool(err <= 1e-2 * want.abs().max() + 1e-6) else 0


class Int4Codes(NamedTuple):
    """Group-wise affine int4 weights, Q4_1's code: w = code * scale + minimum per group of
    32 input channels (GGUF's Q4_1 blocks map onto them one to one)."""

    codes: torch.Tensor  # [out, in] uint8 in 0..15
    scale: torch.Tensor  # [out, in // 32] float16
    minimum: torch.Tensor  # [out, in // 32] float16

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in]: code * scale + minimum, rounded once (as GGUF's dequantizer)."""
        out_f, in_f = self.codes.shape
        c = self.codes.view(out_f, -1, INT4_GROUP).float()
        w = c * self.scale.float()[..., None] + self.minimum.float()[..., None]
        return w.view(out_f, in_f)


class Int8Codes(NamedTuple):
    """Group-wise symmetric int8 weights, Q8_0's code: w = code * scale per group of 32."""

    codes: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out, in // 32] float16

    def dequantize(self) -> torch.Tensor:
        out_f, in_f = self.codes.shape
        w = self.codes.view(out_f, -1, INT4_GROUP).float() * self.scale.float()[..., None]
        return w.view(out_f, in_f)


INT4_GROUP = 32


def quantize_int4(w: torch.Tensor, group_size: int = INT4_GROUP) -> Int4Codes:
    """Affine min/max int4 per group of `group_size` input channels: scale = (max - min) / 15
    and the minimum, both float16, as Q4_1 keeps them."""
    assert group_size == INT4_GROUP, "strata's int4 kernels take groups of 32"
    out_f, in_f = w.shape
    groups = w.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).to(torch.float16)
    minimum = lo.to(torch.float16)
    step = scale.float().clamp(min=1e-8)[..., None]
    codes = ((groups - minimum.float()[..., None]) / step).round().clamp(0, 15)
    return Int4Codes(codes.to(torch.uint8).reshape(out_f, in_f), scale, minimum)


def pack_int4(q: Int4Codes) -> torch.Tensor:
    """Int4Codes in the layout of strata's int4 kernels (cpu_ops.c, cpu_gemm.c): uint8
    [out // 16, groups, 320], per block of 16 outputs and group of 32, 8 chunks of 32 bytes
    (byte 2j + e of chunk c: output j's codes of inputs 2c + e, low nibble, and 16 + 2c + e,
    high nibble), then 16 scales and 16 minima in float16."""
    out_f, in_f = q.codes.shape
    blocks, groups = out_f // 16, in_f // INT4_GROUP
    c = q.codes.view(blocks, 16, groups, 2, INT4_GROUP // 4, 2)
    nibbles = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)  # [b, g, c, j, e]
    sm = torch.stack([q.scale, q.minimum], -1).view(blocks, 16, groups, 2).permute(0, 2, 3, 1)
    sm = sm.contiguous().view(torch.uint8).view(blocks, groups, 64)
    return torch.cat([nibbles.reshape(blocks, groups, INT4_GROUP * 8), sm], -1).contiguous()


def pack_pairs(w: torch.Tensor) -> torch.Tensor:
    """A bfloat16 weight [out, in] in the AVX2 kernel's layout (cpu_gemm.c): [out // 16,
    in // 2, 16, 2], a pair of inputs of 16 outputs one 64-byte line."""
    out_f, in_f = w.shape
    return w.view(out_f // 16, 16, in_f // 2, 2).permute(0, 2, 1, 3).contiguous()


def pack_int8(q: Int8Codes) -> torch.Tensor:
    """Int8Codes in the AVX2 kernel's layout (cpu_gemm.c): uint8 [out // 16, groups, 544],
    per block of 16 outputs and group of 32, the codes as [16 pairs][16 outputs][2], then 16
    float16 scales."""
    out_f, in_f = q.codes.shape
    blocks, groups = out_f // 16, in_f // INT4_GROUP
    c = q.codes.view(blocks, 16, groups, 16, 2).permute(0, 2, 3, 1, 4)  # [b, g, pair, j, e]
    s = q.scale.view(blocks, 16, groups).permute(0, 2, 1).contiguous().view(torch.uint8)
    return torch.cat([c.reshape(blocks, groups, 512).view(torch.uint8), s], -1).contiguous()


class Int4Linear:
    """Weight-only int4 linear (CPU): under a third of the bf16 bytes read per decode step.
    strata's kernels on their own packing (`strata`; cpu_ops.int4_linear: AVX-512 and AMX
    for bfloat16 rows, AVX2 for bfloat16 or float32 rows); on the portable level, ATen's int4
    product on its packing."""

    # NOTE: past the AMX kernel's 16 rows the weight is unpacked (embedded model, 2 cores: a
    # decode step of 16 rows 8.7 ms, of 24 rows 17.0)
    STEP_ROWS = 16

    def __init__(
        self,
        weight: torch.Tensor | Int4Codes,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> None:
        q = weight if isinstance(weight, Int4Codes) else None
        device = q.codes.device if q is not None else weight.device  # type: ignore[union-attr]
        out_f, in_f = q.codes.shape if q is not None else weight.shape  # type: ignore[union-attr]
        if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
            raise ValueError("int4 quantization runs on CPU with bfloat16 or float32 activations")
        if in_f % INT4_GROUP:
            raise ValueError(f"int4 needs in_features ({in_f}) divisible by {INT4_GROUP}")
        if q is None:
            q = quantize_int4(weight)  # type: ignore[arg-type]
        self.strata = out_f % 16 == 0 and cpu_ops.int4_available(dtype)
        if not self.strata and dtype != torch.bfloat16:
            raise ValueError("int4 with float32 activations needs strata's AVX2 kernels")
        # strata's packing holds the scales; ATen's product takes them apart
        self.scales_and_zeros: torch.Tensor | None = None
        if self.strata:
            self.packed = pack_int4(q)
        else:  # ATen's code: w = (code - 8) * scale + zero
            sz = torch.stack([q.scale.float(), q.minimum.float() + 8 * q.scale.float()], -1)
            self.scales_and_zeros = sz.transpose(0, 1).contiguous().to(dtype)
            codes = q.codes.to(torch.int32)
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.group_size = INT4_GROUP
        self.out_features, self.in_features, self.dtype = out_f, in_f, dtype
        self.bias = bias
        if self.strata and cpu_isa() == "avx2":
            self.STEP_ROWS = AVX2_STEP_ROWS

    def nbytes(self) -> int:
        """Bytes a product reads: the codes, and a scale and a minimum per group."""
        return (
            self.out_features * self.in_features // 2
            + self.out_features * (self.in_features // self.group_size) * 4
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if self.strata:
            y = cpu_ops.int4_linear(x, self.packed, self.bias, self.out_features, self.group_size)
        else:
            assert self.scales_and_zeros is not None
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self.packed, self.group_size, self.scales_and_zeros
            )
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features)


class Int8Linear:
    """Weight-only int8 linear on the AVX2 kernel (cpu_gemm.c): a Q8_0 tensor served as it
    is stored (the embedded model's tied LM head: 30 MB read a token instead of 57 in
    bfloat16, and its logits those of the dequantized weights)."""

    STEP_ROWS = 4  # the AVX2 kernel's (AVX2_STEP_ROWS): the LM head sets runner.step_rows

    def __init__(self, q: Int8Codes, bias: torch.Tensor | None) -> None:
        self.out_features, self.in_features = q.codes.shape
        self.packed = pack_int8(q)
        self.bias = bias

    @staticmethod
    def applies(q: Int8Codes, dtype: torch.dtype) -> bool:
        out_f, in_f = q.codes.shape
        return out_f % 16 == 0 and in_f % 32 == 0 and cpu_ops.avx2_linear_available(dtype)

    def nbytes(self) -> int:
        return self.out_features * self.in_features + self.out_features * self.in_features // 16

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = cpu_ops.linear_avx2(
            x.reshape(-1, x.shape[-1]), self.packed, cpu_ops.W_INT8, self.bias, self.out_features
        )
        return y.reshape(*lead, self.out_features)


def make_linear(
    weight: torch.Tensor | Int4Codes | Int8Codes,
    bias: torch.Tensor | None,
    quantization: str,
    dtype: torch.dtype,
) -> Linear | Int4Linear | Int8Linear:
    """A linear layer for a weight as loaded: a tensor (int4 quantizes it), or a GGUF
    tensor's codes, served as they are where strata's kernels take them, else dequantized."""
    if isinstance(weight, Int4Codes) and (cpu_ops.int4_available(dtype) or dtype == torch.bfloat16):
        return Int4Linear(weight, bias, dtype)
    if isinstance(weight, Int8Codes) and Int8Linear.applies(weight, dtype):
        return Int8Linear(weight, bias)
    if isinstance(weight, (Int4Codes, Int8Codes)):
        weight = weight.dequantize().to(dtype)
    if quantization == "int4":
        return Int4Linear(weight, bias, dtype)
    return Linear(weight, bias)
