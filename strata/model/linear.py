"""Linear layers: dense (weights prepacked for oneDNN on CPU), and weight-only group-wise
int4 for memory-bound decode on CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strata.model import cpu_ops

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
        # [out, in]; an opaque MKLDNN tensor when packed
        self.weight = (
            torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS) if self.packed else weight
        )
        # the packed weight's address for cpu_ops.linear_packed (0: oneDNN for every call)
        self.address = _kernel_address(self.weight, weight, bias) if self.packed else 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.address:  # None past a decode batch's rows
            y = cpu_ops.linear_packed(x, self.address, self.bias, self.out_features)
            if y is not None:
                return y
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [None], "")
        return F.linear(x, self.weight, self.bias)


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


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine min/max int4 per group of `group_size` input channels.

    Returns codes [out, in] in 0..15 (int32) and scales_and_zeros [in // group, out, 2] in
    float32, with w ~= (code - 8) * scale + zero.
    """
    out_f, in_f = w.shape
    groups = w.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-8) / 15
    codes = ((groups - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(out_f, in_f)
    zero = lo + 8 * scale
    scales_and_zeros = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1)
    return codes, scales_and_zeros.transpose(0, 1).contiguous()


def pack_int4(codes: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """quantize_int4's codes [out, in] and scales_and_zeros [in // group, out, 2] in the layout
    of cpu_ops.c's int4 kernels: uint8 [out // 16, groups, group * 8 + 64], per block of 16
    outputs and group, group / 4 chunks of 32 bytes (byte 2j + e of chunk c: output j's codes
    of inputs 2c + e, low nibble, and group / 2 + 2c + e, high nibble), then 16 scales and
    16 zeros in bfloat16."""
    out_f, in_f = codes.shape
    blocks, groups = out_f // 16, in_f // group
    c = codes.to(torch.uint8).view(blocks, 16, groups, 2, group // 4, 2)
    nibbles = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)  # [b, g, c, j, e]
    sz = scales_and_zeros.to(torch.bfloat16).view(groups, blocks, 16, 2).permute(1, 0, 3, 2)
    sz = sz.contiguous().view(torch.uint8).view(blocks, groups, 64)
    return torch.cat([nibbles.reshape(blocks, groups, group * 8), sz], -1).contiguous()


class Int4Linear:
    """Weight-only int4 linear (CPU): a quarter of the bf16 bytes read per decode step.
    Where the CPU has AVX512-BF16, strata's kernels on their own packing (`strata`;
    cpu_ops.int4_linear); elsewhere ATen's int4 product on its packing."""

    # NOTE: past the AMX kernel's 16 rows the weight is unpacked (embedded model, 2 cores: a
    # decode step of 16 rows 8.7 ms, of 24 rows 17.0)
    STEP_ROWS = 16

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        group_size: int = 32,
    ) -> None:
        out_f, in_f = weight.shape
        if weight.device.type != "cpu" or dtype != torch.bfloat16:
            raise ValueError("int4 quantization runs on CPU with bfloat16 activations only")
        if in_f % group_size:
            raise ValueError(f"int4 needs in_features ({in_f}) divisible by {group_size}")
        codes, scales_and_zeros = quantize_int4(weight, group_size)
        sz = scales_and_zeros.to(dtype)  # [in // group, out, 2]
        self.strata = out_f % 16 == 0 and cpu_ops.int4_available()
        # strata's packing holds the scales; ATen's product takes them apart
        self.scales_and_zeros: torch.Tensor | None = None if self.strata else sz
        if self.strata:
            self.packed = pack_int4(codes, sz, group_size)
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.group_size = group_size
        self.out_features, self.in_features = out_f, in_f
        self.bias = bias

    def nbytes(self) -> int:
        """Bytes a product reads: the codes, and a scale and a zero per group (bfloat16)."""
        return (
            self.out_features * self.in_features // 2
            + self.out_features * (self.in_features // self.group_size) * 4
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if self.strata:
            y = cpu_ops.int4_linear(x, self.packed, self.bias, self.out_features,
                                    self.group_size)  # fmt: skip
        else:
            assert self.scales_and_zeros is not None
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self.packed, self.group_size, self.scales_and_zeros
            )
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features)


def make_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, quantization: str
) -> Linear | Int4Linear:
    if quantization == "int4":
        return Int4Linear(weight, bias, weight.dtype)
    return Linear(weight, bias)
