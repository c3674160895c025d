"""Single stream, one run, one machine: per-token time of the plain in-process loop, the
inter-token latency through `strata serve`'s streaming API (with n-gram speculation, its
default, and without), and llama-cpp-python on the embedded model's own GGUF (when
installed: `make peers`).

Usage: python bench/serve_latency.py [--new-tokens 64] [--repeats 3] [--serve-args "..."]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import httpx

from launch.local import running_server
from strata.bench import run_like_an_engine_process

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def in_process(
    new_tokens: int,
    repeats: int,
    dtype: str,
    quantization: str,
    model_path: str | None = None,
    device: str = "cpu",
) -> list[float]:
    """Seconds per decoded token of strata.engine.generate.generate on the main thread."""
    from strata.config import KVPoolConfig, ModelConfig
    from strata.engine.generate import generate
    from strata.engine.runner import ModelRunner

    model = ModelConfig(model_path, dtype, quantization=quantization, device=device)
    runner = ModelRunner.from_config(model, KVPoolConfig(num_pages=256))
    ids = runner.tokenizer(PROMPT)["input_ids"]
    per_token = []
    for r in range(repeats + 1):
        stamps = [time.perf_counter() for _ in generate(runner, ids, new_tokens)]
        if r:  # the first run warms up
            per_token.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    return per_token


def served(url: str, new_tokens: int, repeats: int) -> dict[str, list[float]]:
    """Streaming /generate with ignore_eos: time per token after the first (an event may
    carry several: verified drafts), and the TTFT."""
    body = {
        "text": PROMPT,
        "stream": True,
        "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True},
    }
    itl, ttft = [], []
    with httpx.Client(timeout=120) as http:
        for r in range(repeats + 1):
            start = time.perf_counter()
            stamps, counts = [], []
            with http.stream("POST", f"{url}/generate", json=body) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if line.startswith("data:") and line.strip() != "data: [DONE]":
                        stamps.append(time.perf_counter())
                        counts.append(len(json.loads(line[5:])["output_ids"]))
            if r:
                ttft.append(stamps[0] - start)
                itl.append((stamps[-1] - stamps[0]) / (counts[-1] - counts[0]))
    return {"itl": itl, "ttft": ttft}


def served_name(tag: str, drafts: bool = False) -> str:
    return f"strata serve, {tag}, n-gram drafts" if drafts else f"strata serve, {tag} (stream ITL)"


def llama_cpp(new_tokens: int, repeats: int) -> list[float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from strata.model.loader import embedded_gguf

    threads = os.cpu_count()  # its default is half the cores
    llm = Llama(
        str(embedded_gguf()), n_ctx=2048, verbose=False, n_threads=threads, n_threads_batch=threads
    )
    ids = llm.tokenize(PROMPT.encode())
    per_token = []
    for r in range(repeats + 1):
        llm.reset()
        stamps = []
        for i, _ in enumerate(llm.generate(ids, temp=0.0)):
            stamps.append(time.perf_counter())
            if i + 1 >= new_tokens:
                break
        if r:
            per_token.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    return per_token


def main() -> None:
    run_like_an_engine_process()
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--quantizations",
        default="auto,none",
        help="--quantization values to serve (auto: the default, int4 from the "
        "GGUF's Q4_1 blocks where the kernels run)",
    )
    ap.add_argument("--serve-args", default="", help="extra flags for strata serve")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    ms: dict[str, float] = {}
    ttft: dict[str, float] = {}
    for quant in a.quantizations.split(","):
        tag = f"--dtype {a.dtype} --quantization {quant}"
        flags = ["--dtype", a.dtype, "--quantization", quant, *a.serve_args.split()]
        with running_server(*flags, "--speculative-algorithm", "none") as url:
            serve = served(url, a.new_tokens, a.repeats)
        ms[served_name(tag)] = statistics.median(serve["itl"]) * 1e3
        ttft[tag] = statistics.median(serve["ttft"]) * 1e3
        with running_server(*flags) as url:
            spec = served(url, a.new_tokens, a.repeats)
        ms[served_name(tag, drafts=True)] = statistics.median(spec["itl"]) * 1e3
        loop = in_process(a.new_tokens, a.repeats, a.dtype, quant)
        ms[f"in-process loop, {tag}"] = statistics.median(loop) * 1e3
    peer = llama_cpp(a.new_tokens, a.repeats)
    if peer is not None:
        ms["llama-cpp-python, Q4_1"] = statistics.median(peer) * 1e3
    print(f"\nsingle stream, {a.new_tokens} tokens, median of {a.repeats} runs")
    print(f"{'system':44} {'ms/token':>9} {'tok/s':>7}")
    for name, v in ms.items():
        print(f"{name:44} {v:9.2f} {1e3 / v:7.1f}")
    for tag in ttft:
        served_ms, loop_ms = ms[served_name(tag)], ms[f"in-process loop, {tag}"]
        line = f"{tag}: served / in-process {served_ms / loop_ms:.2f}x, TTFT {ttft[tag]:.0f} ms"
        if peer is not None:
            peer_ms = ms["llama-cpp-python, Q4_1"]
            for name in (served_name(tag), served_name(tag, drafts=True)):
                line += f"; {name} vs llama-cpp-python {peer_ms / ms[name]:.2f}x"
        print(line)
    if a.out:
        Path(a.out).write_text(json.dumps({"ms_per_token": ms, "ttft_ms": ttft}, indent=2))


if __name__ == "__main__":
    main()
