"""Each model family's decode step beside Llama's of the same size, in one run: tiny random
checkpoints (transformers' own classes, the same hidden size, layers, heads and MLP width),
a batch of sequences prefilled, then timed decode steps on strata's default CPU path for the
family (a family's extra ops: head norms, sandwich norms, soft caps, a gelu MLP).

Usage: python bench/family_steps.py [--dtype bfloat16] [--batch 8] [--steps 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strata.batch import SequenceChunk  # noqa: E402
from strata.config import KVPoolConfig, ModelConfig  # noqa: E402
from strata.engine.runner import ModelRunner  # noqa: E402
from tests.conftest import tiny_hf_model  # noqa: E402

SIZE = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 64},
    "phi3": {"pad_token_id": 0},
    "gemma2": {"head_dim": 64, "pad_token_id": 0, "query_pre_attn_scalar": 64},
    # Gemma 3's own window (512) is longer than the prompts: its layers run the kernels
    "gemma3": {"head_dim": 64, "pad_token_id": 0, "query_pre_attn_scalar": 64},
    # 8 experts of 768, 2 a token: as many active MLP weights as the others' 1536
    "qwen3_moe": {
        "head_dim": 64,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 768,
    },
}


def step_ms(folder: str, dtype: str, batch: int, steps: int, prompt: int) -> list[float]:
    runner = ModelRunner.from_config(
        ModelConfig(folder, dtype=dtype), KVPoolConfig(page_size=16, num_pages=1024)
    )
    chunks = []
    for b in range(batch):
        ids = [(b * 31 + i * 7) % SIZE["vocab_size"] for i in range(prompt)]
        pages = runner.pool.alloc(runner.pages_for(prompt + steps + 1))
        chunks.append(SequenceChunk(ids, 0, pages))
    logits = runner.forward(chunks)
    times = []
    for _ in range(steps):
        nxt = logits.argmax(-1).tolist()
        chunks = [
            SequenceChunk([t], c.prefix_len + len(c.token_ids), c.pages)
            for c, t in zip(chunks, nxt)
        ]
        start = time.perf_counter()
        logits = runner.forward(chunks)
        times.append((time.perf_counter() - start) * 1e3)
    return times[steps // 4 :]  # the first steps warm up


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=200)
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for name, extra in FAMILIES.items():
            folders[name] = Path(tmp) / name
            tiny_hf_model(name, **{**SIZE, **extra}).save_pretrained(folders[name])
        step_ms(str(folders["llama"]), a.dtype, a.batch, a.steps, a.prompt)  # warms up
        for name, folder in folders.items():
            ms = step_ms(str(folder), a.dtype, a.batch, a.steps, a.prompt)
            rows.append((name, statistics.median(ms)))
            print(f"{name:8} {rows[-1][1]:7.2f} ms a step", flush=True)
    base = rows[0][1]
    print(f"\n{a.dtype}, batch {a.batch}, {a.prompt}-token prompts; vs llama:")
    for name, ms in rows:
        print(f"  {name:8} {ms:7.2f} ms  {ms / base:5.2f}x")


if __name__ == "__main__":
    main()
