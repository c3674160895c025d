"""A GGUF file's quantized tensors as strata serves them, not dequantized: Q4_1 blocks (32
weights, a float16 scale and minimum: w = q * d + m) are strata's int4 groups one to one
(linear.Int4Codes), Q8_0 blocks (w = q * d) its int8 groups (linear.Int8Codes). So the
embedded model's int4 layers compute what its dequantized checkpoint computes, without a
second quantization. Llama-architecture files only (the names and the q/k row order below);
any other tensor type stays dense.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from strata.model.linear import Int4Codes, Int8Codes
from strata.model.spec import ModelSpec

Q4_1, Q8_0 = "Q4_1", "Q8_0"
# GGML's type ids and block sizes (elements, bytes) of the types read as codes
BLOCKS = {3: (Q4_1, 32, 20), 8: (Q8_0, 32, 34)}
# GGUF metadata value types of fixed size (bytes); 8 is a string, 9 an array
SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class Tensor(NamedTuple):
    kind: str | None  # Q4_1, Q8_0, or None for any other type
    shape: tuple[int, ...]  # fastest dimension first, as GGUF lists it
    data: np.ndarray  # the raw blocks (uint8), mapped from the file; empty for other kinds


class _Cursor:
    """Reads GGUF's little-endian values from a mapped file, front to back."""

    def __init__(self, mv: memoryview) -> None:
        self.mv, self.at = mv, 0

    def take(self, fmt: str) -> tuple[int, ...]:
        got = struct.unpack_from("<" + fmt, self.mv, self.at)
        self.at += struct.calcsize("<" + fmt)
        return got

    def string(self) -> str:
        (n,) = self.take("Q")
        self.at += n
        return bytes(self.mv[self.at - n : self.at]).decode(errors="replace")

    def skip(self, kind: int) -> None:
        """Step over one metadata value of type kind (strings one by one: their lengths)."""
        if kind in SCALARS:
            self.at += SCALARS[kind]
        elif kind == 8:
            (n,) = self.take("Q")
            self.at += n
        elif kind == 9:
            item, count = self.take("IQ")
            if item in SCALARS:
                self.at += SCALARS[item] * count
            else:
                for _ in range(count):
                    self.skip(item)
        else:
            raise ValueError(f"unknown GGUF value type {kind}")


def read_tensors(path: Path) -> tuple[str, dict[str, Tensor]]:
    """A GGUF file's architecture and tensor table, the raw data mapped, not read. The
    metadata is skipped, not parsed: gguf.GGUFReader builds every value of it (the embedded
    model's 100k tokenizer strings took 5.4 s at each start); here only the architecture and
    the alignment are decoded."""
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(buf.data))
    if bytes(cur.mv[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    cur.at = 4
    version, n_tensors, n_kv = cur.take("IQQ")
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or later)")
    arch, align = "", 32
    for _ in range(n_kv):
        key, (kind,) = cur.string(), cur.take("I")
        if key == "general.architecture" and kind == 8:
            arch = cur.string()
        elif key == "general.alignment" and kind == 4:
            (align,) = cur.take("I")
        else:
            cur.skip(kind)
    infos = []
    for _ in range(n_tensors):
        name, (dims,) = cur.string(), cur.take("I")
        shape = cur.take(f"{dims}Q")
        type_id, offset = cur.take("IQ")
        infos.append((name, type_id, shape, offset))
    start = -(-cur.at // align) * align
    tensors = {}
    for name, type_id, shape, offset in infos:
        code, per, size = BLOCKS.get(type_id, (None, 1, 0))
        n = int(np.prod(shape)) // per * size
        tensors[name] = Tensor(code, shape, buf[start + offset : start + offset + n])
    return arch, tensors


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
    """The fused weights (Family.fuse's names) that this GGUF file holds as Q4_1 (the
    layers' products) or Q8_0 (the LM head), as codes; {} for a file of another
    architecture."""
    arch, tensors = read_tensors(path)
    if arch != "llama":
        return {}

    def codes(name: str, kind: str) -> Int4Codes | Int8Codes | None:
        t = tensors.get(name)
        if t is None or t.kind != kind or len(t.shape) != 2:
            return None
        cols, rows = t.shape
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
