"""The CUDA path on a GPU machine, in one run: the Triton kernels against the torch reference
and torch's scaled_dot_product_attention on the same shapes, the model on the GPU against
transformers (the oracle) on the same weights, decode step times by batch size, and one
stream through `strata serve --device cuda` beside the in-process loop.

The embedded model's weights do not travel to such a machine, so the model here is its
architecture (SmolLM2-135M: 30 layers, 9 query and 3 KV heads of 64) with random weights,
beside its real tokenizer (a folder holding the embedded model's config and tokenizer files).

Usage: PYTHONPATH=. python bench/gpu_check.py [--model-files DIR] [--out F] [--skip serve ...]
(DIR: a folder with the model's config.json and tokenizer files; by default the embedded
model's converted checkpoint, whose weights are not used.) Its kernel tests:
STRATA_TEST_DEVICE=cuda TRITON_INTERPRET=0 python -m pytest tests/core/test_triton_attention.py \
    tests/core/test_cuda_graph.py
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from strata.attention import reference as ref
from strata.kv.pool import KVCache

PAGE = 16


def bench_ms(fn: Any, *args: Any, **kwargs: Any) -> float:
    """Median ms of fn(*args, **kwargs) on the GPU (CUDA events through triton's do_bench)."""
    import triton.testing

    call = functools.partial(fn, *args, **kwargs)
    return float(triton.testing.do_bench(call, warmup=20, rep=100, return_mode="median"))


def random_pool(pages: int, kv_heads: int, dim: int, dtype: torch.dtype) -> KVCache:
    kv = KVCache(1, pages, PAGE, kv_heads, dim, dtype, "cuda")
    kv.data.normal_()
    return kv


def decode_kernels(rows: list[dict[str, Any]]) -> None:
    """Paged decode: Triton (split as chosen, and one program per sequence and KV head), the
    reference (gather + SDPA), and SDPA over contiguous K/V of the same lengths."""
    from strata.kernels.triton import attention as tk

    for heads, kv_heads, dim in ((9, 3, 64), (32, 8, 128)):
        for batch, context in ((1, 512), (1, 4096), (8, 4096), (32, 1024), (32, 4096), (128, 1024)):
            pages = batch * context // PAGE
            kv = random_pool(pages + 1, kv_heads, dim, torch.bfloat16)
            layer = kv.layers[0]
            table = (torch.randperm(pages, device="cuda") + 1).view(batch, -1)
            lens = torch.full((batch,), context, device="cuda")
            q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device="cuda")
            scale = dim**-0.5
            mask = torch.ones(batch, context, dtype=torch.bool, device="cuda")
            want = ref.paged_decode(q, layer.k, layer.v, table, mask, scale)
            got = tk.paged_decode(q, layer, table, lens, scale)
            k = layer.k[table].reshape(batch, context, kv_heads, dim).transpose(1, 2)
            v = layer.v[table].reshape(batch, context, kv_heads, dim).transpose(1, 2)
            k, v = k.contiguous(), v.contiguous()
            sdpa = F.scaled_dot_product_attention
            kv_bytes = 2 * batch * context * kv_heads * dim * 2
            t_auto = bench_ms(tk.paged_decode, q, layer, table, lens, scale)
            row = {
                "kernel": "decode",
                "heads": f"{heads}/{kv_heads}x{dim}",
                "batch": batch,
                "context": context,
                "splits": tk.decode_splits(batch * kv_heads, context, q.device),
                "max_err_vs_reference": float((got.float() - want.float()).abs().max()),
                "triton_ms": t_auto,
                "triton_1split_ms": bench_ms(tk.paged_decode, q, layer, table, lens, scale, 1),
                "reference_ms": bench_ms(ref.paged_decode, q, layer.k, layer.v, table, mask, scale),
                "sdpa_contiguous_ms": bench_ms(
                    sdpa, q[:, :, None], k, v, scale=scale, enable_gqa=True
                ),
                "triton_GBps": kv_bytes / t_auto / 1e6,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            del kv, k, v


def prefill_kernels(rows: list[dict[str, Any]]) -> None:
    """Prefill of one sequence over a cached prefix: Triton vs the reference; with no
    prefix, vs causal SDPA over contiguous K/V too."""
    from strata.kernels.triton import attention as tk

    for heads, kv_heads, dim in ((9, 3, 64), (32, 8, 128)):
        for prefix, new in ((0, 512), (0, 2048), (2048, 512), (3584, 512)):
            total = prefix + new
            pages = -(-total // PAGE)
            kv = random_pool(pages + 1, kv_heads, dim, torch.bfloat16)
            layer = kv.layers[0]
            page_ids = torch.randperm(pages, device="cuda") + 1
            q = torch.randn(new, heads, dim, dtype=torch.bfloat16, device="cuda")
            k = layer.k[page_ids].reshape(-1, kv_heads, dim)[prefix:total]
            v = layer.v[page_ids].reshape(-1, kv_heads, dim)[prefix:total]
            scale = dim**-0.5
            args = (
                q,
                layer,
                page_ids[None],
                torch.tensor([0], device="cuda"),
                torch.tensor([new], device="cuda"),
                torch.tensor([prefix], device="cuda"),
                new,
                scale,
            )
            got = tk.paged_prefill(*args)
            want = ref.paged_prefill(q, k, v, layer.k, layer.v, page_ids, prefix, scale)
            flops = 4 * heads * dim * new * (prefix + (new + 1) / 2)
            t = bench_ms(tk.paged_prefill, *args)
            row = {
                "kernel": "prefill",
                "heads": f"{heads}/{kv_heads}x{dim}",
                "prefix": prefix,
                "new": new,
                "max_err_vs_reference": float((got.float() - want.float()).abs().max()),
                "triton_ms": t,
                "triton_TFLOPs": flops / t / 1e9,
                "reference_ms": bench_ms(
                    ref.paged_prefill, q, k, v, layer.k, layer.v, page_ids, prefix, scale
                ),
            }
            if prefix == 0:
                qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
                row["sdpa_causal_ms"] = bench_ms(
                    F.scaled_dot_product_attention,
                    qt,
                    kt,
                    vt,
                    is_causal=True,
                    scale=scale,
                    enable_gqa=True,
                )
            rows.append(row)
            print(json.dumps(row), flush=True)


def sweep(rows: list[dict[str, Any]]) -> None:
    """The kernels' block sizes (triton_kernels.DECODE_BLOCK and PREFILL_BLOCKS) on a few
    shapes: ms for each."""
    from strata.kernels.triton import attention as tk

    for heads, kv_heads, dim, batch, context in (
        (9, 3, 64, 1, 4096),
        (9, 3, 64, 32, 4096),
        (32, 8, 128, 8, 4096),
    ):
        pages = batch * context // PAGE
        layer = random_pool(pages + 1, kv_heads, dim, torch.bfloat16).layers[0]
        table = (torch.randperm(pages, device="cuda") + 1).view(batch, -1)
        lens = torch.full((batch,), context, device="cuda")
        q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device="cuda")
        row: dict[str, Any] = {
            "sweep": "decode",
            "shape": f"{heads}/{kv_heads}x{dim}",
            "batch": batch,
            "context": context,
        }
        for block in (16, 32, 64, 128):
            row[f"block_{block}_ms"] = bench_ms(
                tk.paged_decode, q, layer, table, lens, dim**-0.5, None, block
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    for heads, kv_heads, dim in ((9, 3, 64), (32, 8, 128)):
        new = 2048
        layer = random_pool(new // PAGE + 1, kv_heads, dim, torch.bfloat16).layers[0]
        page_ids = torch.randperm(new // PAGE, device="cuda") + 1
        q = torch.randn(new, heads, dim, dtype=torch.bfloat16, device="cuda")
        zero, n = torch.tensor([0], device="cuda"), torch.tensor([new], device="cuda")
        row = {"sweep": "prefill", "shape": f"{heads}/{kv_heads}x{dim}", "new": new}
        for blocks in ((16, 16), (32, 32), (64, 32), (64, 64), (128, 32), (128, 64)):
            row[f"blocks_{blocks[0]}x{blocks[1]}_ms"] = bench_ms(
                tk.paged_prefill,
                q,
                layer,
                page_ids[None],
                zero,
                n,
                zero,
                new,
                dim**-0.5,
                blocks,
            )
        rows.append(row)
        print(json.dumps(row), flush=True)


def write_kernel(rows: list[dict[str, Any]]) -> None:
    """KV write (with page summaries) of 4096 tokens in pages of 16: Triton vs reference."""
    from strata.kernels.triton import attention as tk

    kv_heads, dim, tokens = 3, 64, 4096
    a = random_pool(tokens // PAGE + 1, kv_heads, dim, torch.bfloat16)
    b = random_pool(tokens // PAGE + 1, kv_heads, dim, torch.bfloat16)
    b.data.copy_(a.data)
    slots = torch.arange(tokens, device="cuda") + PAGE
    where = ref.split_slots(slots, PAGE)
    k = torch.randn(tokens, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    ref.write_kv(a.layers[0], where, k, v)
    tk.write_kv(b.layers[0], where, k, v)
    row = {
        "kernel": "write_kv",
        "tokens": tokens,
        "bit_equal": bool(torch.equal(a.data, b.data)),
        "triton_ms": bench_ms(tk.write_kv, b.layers[0], where, k, v),
        "reference_ms": bench_ms(ref.write_kv, a.layers[0], where, k, v),
    }
    rows.append(row)
    print(json.dumps(row), flush=True)


def make_model(files: Path, into: Path) -> Path:
    """The embedded model's architecture with random weights (norms perturbed so they
    matter), saved as a Hugging Face folder beside its tokenizer files."""
    import transformers

    into.mkdir(parents=True, exist_ok=True)
    for f in files.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, into / f.name)
    cfg = transformers.AutoConfig.from_pretrained(into)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(into)
    return into


def oracle(folder: Path, device: str, out: dict[str, Any]) -> None:
    """Prefill 60 tokens, then 16 greedy steps on strata (Triton backend) and transformers:
    the largest logit difference at any step, and whether every greedy token agrees."""
    import transformers

    from strata.batch import SequenceChunk
    from strata.config import KVPoolConfig, ModelConfig
    from strata.engine.runner import ModelRunner

    prompt = [(i * 37 + 11) % 40000 for i in range(60)]
    for dtype in ("float32", "bfloat16"):
        tdt = getattr(torch, dtype)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=tdt)
        hf = hf.to(torch.device(device)).eval()
        runner = ModelRunner.from_config(
            ModelConfig(str(folder), dtype, device=device, sparse=_dense()),
            KVPoolConfig(PAGE, 256),
        )
        pages = runner.pool.alloc(8)
        ids, chunk, worst, agree = list(prompt), SequenceChunk(prompt, 0, pages), 0.0, True
        with torch.no_grad():
            for _ in range(16):
                got = runner.forward([chunk])[0]
                want = hf(torch.tensor([ids], device=device)).logits[0, -1].float()
                worst = max(worst, float((got - want).abs().max()))
                agree &= int(got.argmax()) == int(want.argmax())
                chunk = SequenceChunk([int(want.argmax())], len(ids), pages)
                ids.append(int(want.argmax()))
        out[f"oracle_{dtype}"] = {"max_logit_diff": worst, "greedy_agrees": agree}
        print(dtype, out[f"oracle_{dtype}"], flush=True)
        del hf, runner


def _dense() -> Any:
    from strata.config import SparseConfig

    return SparseConfig(threshold=0)


def steps(folder: Path, device: str, out: dict[str, Any]) -> None:
    """bench/decode_steps.py's step time (forward + greedy pick), dense: eager, and replaying
    CUDA graphs (strata.engine.cuda_graph); then where an eager step's time goes."""
    from bench.decode_steps import step_ms
    from strata.config import KVPoolConfig, ModelConfig
    from strata.engine.runner import ModelRunner

    for name, max_bs in (("eager", 0), ("graphs", 64)):
        start = time.perf_counter()
        runner = ModelRunner.from_config(
            ModelConfig(
                str(folder), "bfloat16", device=device, sparse=_dense(), cuda_graph_max_bs=max_bs
            ),
            KVPoolConfig(PAGE, 12000),
        )
        out[f"{name}_load_s"] = round(time.perf_counter() - start, 1)
        table = {}
        for context in (64, 700, 2000):
            for batch in (1, 8, 32, 64):
                table[f"{context}x{batch}"] = step_ms(runner, batch, context, 20)
            row = [f"{k}={v:.3f}" for k, v in table.items() if k.startswith(f"{context}x")]
            print(name, context, *row, flush=True)
        out[f"decode_step_ms_{name}"] = table
        if name == "eager":
            out["eager_profile"] = profile_step(runner)
        del runner
        torch.cuda.empty_cache()


def profile_step(runner: Any) -> str:
    """torch.profiler's table of one eager decode step of 8 sequences at 64 tokens."""
    from torch.profiler import ProfilerActivity, profile

    from bench.decode_steps import step_ms

    step_ms(runner, 8, 64, 3)  # warm
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_ms(runner, 8, 64, 1)
    text = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(text, flush=True)
    return str(text)


def serve(folder: Path, device: str, out: dict[str, Any]) -> None:
    """One stream through strata serve on the GPU (CUDA graphs, as served by default) beside
    the in-process loop."""
    from bench.serve_latency import in_process, served
    from launch.local import running_server

    flags = ["--model", str(folder), "--device", device, "--dtype", "bfloat16"]
    with running_server(*flags, timeout=300) as url:
        s = served(url, 64, 5)
        for streams in (16, 64):
            out[f"serve_{streams}_streams_tok_s"] = concurrent_tok_s(url, streams, 128)
    loop = in_process(64, 5, "bfloat16", "none", str(folder), device)
    out["serve"] = {
        "served_itl_ms": statistics.median(s["itl"]) * 1e3,
        "served_ttft_ms": statistics.median(s["ttft"]) * 1e3,
        "in_process_ms": statistics.median(loop) * 1e3,
    }
    print(out["serve"], flush=True)


def concurrent_tok_s(url: str, streams: int, tokens: int) -> float:
    """Output tok/s of `streams` concurrent streaming /generate requests (distinct prompts,
    ignore_eos), wall time from the first request to the last token."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def one(i: int) -> int:
        body = {
            "text": f"Story {i}: the lighthouse keeper",
            "stream": True,
            "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True},
        }
        n = 0
        http = httpx.Client(timeout=300)
        with http, http.stream("POST", f"{url}/generate", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                n += line.startswith("data:") and line.strip() != "data: [DONE]"
        return n

    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        events = sum(pool.map(one, range(streams)))
    tok_s = streams * tokens / (time.perf_counter() - start)
    print(f"{streams} streams: {tok_s:.0f} tok/s ({events} events)", flush=True)
    return tok_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model-files",
        type=Path,
        default=None,
        help="config and tokenizer files (default: the embedded model's)",
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip", nargs="*", default=[], help="parts to leave out")
    ap.add_argument("--device", default="cuda", help="for the model's parts (cpu: a dry run)")
    a = ap.parse_args()
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    out: dict[str, Any] = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__}
    print(out, flush=True)
    rows: list[dict[str, Any]] = []
    out["kernels"] = rows

    def run(name: str, fn: Any, *args: Any) -> None:
        if name in a.skip:
            return
        start = time.perf_counter()
        try:
            fn(*args)
        except Exception as exc:  # a part that fails still leaves the others' figures
            import traceback

            traceback.print_exc()
            out[f"{name}_error"] = repr(exc)
        out[f"{name}_s"] = round(time.perf_counter() - start, 1)
        if a.out:
            a.out.write_text(json.dumps(out, indent=1))

    run("decode", decode_kernels, rows)
    run("prefill", prefill_kernels, rows)
    run("write", write_kernel, rows)
    run("sweep", sweep, rows)
    with tempfile.TemporaryDirectory() as tmp:
        if a.model_files is None:
            from strata.model.loader import resolve_checkpoint

            a.model_files = resolve_checkpoint(None)
        folder = make_model(a.model_files, Path(tmp) / "model")
        run("oracle", oracle, folder, a.device, out)
        run("steps", steps, folder, a.device, out)
        run("serve", serve, folder, a.device, out)


if __name__ == "__main__":
    main()
