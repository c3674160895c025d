"""A GGUF file's quantized tensors as strata serves them, not dequantized: Q4_1 blocks (32
weights, a float16 scale and minimum: w = q * d + m) are strata's int4 groups one to one
(linear.Int4Codes), Q8_0 blocks (w = q * d) its int8 groups (linear.Int8Codes). So the
embedded model's int4 layers compute what its dequantized checkpoint computes, without a
second quantization. Llama-architecture files only (the names and the q/k row order below);
any other tensor type stays dense.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from strata.model.linear import Int4Codes, Int8Codes
from strata.model.spec import ModelSpec

Q4_1, Q8_0 = "Q4_1", "Q8_0"


def _unpermute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter interleaves each q/k head's rows for its rotary layout; this is
    the inverse transformers applies when it dequantizes (rows only: each row's blocks move
    whole)."""
    dim = rows.shape[0] // heads // 2
    return rows.reshape(heads, dim, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)


def _q4_1(raw: np.ndarray, rows: int, cols: int) -> Int4Codes:
    blocks = torch.from_numpy(np.ascontiguousarray(raw).reshape(rows, cols // 32, 20).copy())
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
    qs = blocks[..., 4:]  # byte j: weight j (low nibble), weight 16 + j (high)
    codes = torch.cat([qs & 15, qs >> 4], -1).reshape(rows, cols)
    return Int4Codes(codes, d, m)


def _q8_0(raw: np.ndarray, rows: int, cols: int) -> Int8Codes:
    blocks = torch.from_numpy(np.ascontiguousarray(raw).reshape(rows, cols // 32, 34).copy())
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    codes = blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, cols)
    return Int8Codes(codes, d)


def _rows(q: Int4Codes, heads: int) -> Int4Codes:
    return Int4Codes(*(_unpermute(t, heads) for t in q))


def _cat(parts: list[Int4Codes]) -> Int4Codes:
    return Int4Codes(*(torch.cat(ts) for ts in zip(*parts)))


def read_codes(path: Path, spec: ModelSpec) -> dict[str, Int4Codes | Int8Codes]:
    """The fused weights (loader.fuse_weights's names) that this GGUF file holds as Q4_1 (the
    layers' products) or Q8_0 (the LM head), as codes; {} for a file of another
    architecture."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = reader.fields.get("general.architecture")
    if arch is None or bytes(arch.parts[arch.data[0]]).decode() != "llama":
        return {}
    tensors = {t.name: t for t in reader.tensors}

    def codes(name: str, kind: str) -> Int4Codes | Int8Codes | None:
        t = tensors.get(name)
        if t is None or t.tensor_type.name != kind or len(t.shape) != 2:
            return None
        cols, rows = (int(n) for n in t.shape)  # GGUF lists the fastest dimension first
        return (_q4_1 if kind == Q4_1 else _q8_0)(t.data, rows, cols)

    out: dict[str, Int4Codes | Int8Codes] = {}
    for i in range(spec.num_layers):
        b, p = f"blk.{i}.", f"layers.{i}."
        q, k, v = (codes(f"{b}attn_{n}.weight", Q4_1) for n in "qkv")
        if isinstance(q, Int4Codes) and isinstance(k, Int4Codes) and isinstance(v, Int4Codes):
            heads, kv_heads = spec.num_heads, spec.num_kv_heads
            out[p + "qkv"] = _cat([_rows(q, heads), _rows(k, kv_heads), v])
        gate, up = codes(b + "ffn_gate.weight", Q4_1), codes(b + "ffn_up.weight", Q4_1)
        if isinstance(gate, Int4Codes) and isinstance(up, Int4Codes):
            out[p + "gate_up"] = _cat([gate, up])
        for ours, theirs in (("o_proj", "attn_output"), ("down", "ffn_down")):
            c = codes(f"{b}{theirs}.weight", Q4_1)
            if c is not None:
                out[p + ours] = c
    head = codes("token_embd.weight" if spec.tie_word_embeddings else "output.weight", Q8_0)
    if head is not None:
        out["lm_head"] = head
    return out
