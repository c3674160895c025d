"""Linear layers: dense, and weight-only group-wise int4 for memory-bound decode on CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight  # [out, in]
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


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


class Int4Linear:
    """Weight-only int4 linear (CPU): a quarter of the bf16 bytes read per decode step."""

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
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.scales_and_zeros = scales_and_zeros.to(dtype)
        self.group_size = group_size
        self.out_features = out_f
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, x.shape[-1]), self.packed, self.group_size, self.scales_and_zeros
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
