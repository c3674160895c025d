"""The `strata` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

from strata.bench.cli import add_bench_args
from strata.config import (
    ATTENTION_BACKENDS,
    PREFETCH_POLICIES,
    QUANTIZATIONS,
    SPARSE_SPREAD,
    WRITE_POLICIES,
    HiCacheConfig,
    KVPoolConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    SparseConfig,
    cache_dir,
    env,
)

log = logging.getLogger("strata")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", default=None, help="HF checkpoint folder or GGUF file")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="int4: group-wise weight-only int4 linear layers")  # fmt: skip
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--num-pages", type=int, default=4096,
                   help="KV pages in the device pool (L1), page-size tokens each")  # fmt: skip
    p.add_argument("--mem-fraction-static", type=float, default=None,
                   help="size the KV pool so weights + pool take this fraction of the "
                   "device's memory (host RAM on CPU); overrides --num-pages")  # fmt: skip
    p.add_argument("--context-length", type=int, default=None,
                   help="cap the context below the model's max_position_embeddings")  # fmt: skip
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="attention kernels: triton (CUDA), cpu (C kernels), torch (reference "
                   "ops); auto picks triton on CUDA and cpu on CPU")  # fmt: skip
    p.add_argument(
        "--tp-size", "--tp", dest="tp_size", type=int, default=1,
        help="tensor parallelism: run the model over this many ranks (processes on CPU, GPUs "
        "on CUDA), each with its share of heads, MLP and vocabulary",
    )  # fmt: skip
    p.add_argument("--cuda-graph-max-bs", type=int, default=ModelConfig.cuda_graph_max_bs,
                   help="CUDA: decode batches of up to this many sequences replay graphs "
                   "captured at start (one per batch-size bucket); 0: never")  # fmt: skip
    p.add_argument(
        "--disable-cuda-graph",
        action="store_true",
        help="CUDA: every step runs eagerly (--cuda-graph-max-bs 0)",
    )
    p.add_argument("--log-level", default="warning", help="debug, info, warning or error")
    d = SparseConfig()
    p.add_argument("--attention-sparsity-threshold", type=float, default=d.threshold,
                   help="sparse decode skips a page whose bound on the attention logit is "
                   f"more than {SPARSE_SPREAD} ln(1/threshold) nats under the best page's "
                   f"({-d.min_score:.1f} at {d.threshold}), per step, layer and KV head; 0: "
                   "dense attention")  # fmt: skip
    p.add_argument("--sparse-min-context", type=int, default=d.min_context,
                   help="tokens: shorter sequences decode densely")  # fmt: skip
    p.add_argument("--sparse-budget", type=float, default=d.budget,
                   help="pages sparse decode keeps at most: a count (>= 1) or a fraction of "
                   "the context's pages (< 1); 0: no cap")  # fmt: skip
    p.add_argument("--sparse-dense-layers", type=int, default=d.dense_layers,
                   help="the first layers always decode densely")  # fmt: skip
    p.add_argument("--sparse-demote-after", type=int, default=d.demote_after,
                   help="with --enable-hierarchical-cache (CPU): a running request's page no "
                   "sparse layer kept for this many steps may move to L2 when L1 runs short, "
                   "and comes back when selected; 0: never")  # fmt: skip


def sparse_config(a: argparse.Namespace) -> SparseConfig:
    return SparseConfig(
        threshold=a.attention_sparsity_threshold, min_context=a.sparse_min_context,
        budget=a.sparse_budget, dense_layers=a.sparse_dense_layers,
        demote_after=a.sparse_demote_after,
    )  # fmt: skip


def sparse_argv(a: argparse.Namespace) -> list[str]:
    return ["--attention-sparsity-threshold", str(a.attention_sparsity_threshold),
            "--sparse-min-context", str(a.sparse_min_context),
            "--sparse-budget", str(a.sparse_budget),
            "--sparse-dense-layers", str(a.sparse_dense_layers),
            "--sparse-demote-after", str(a.sparse_demote_after)]  # fmt: skip


def add_tls_args(p: argparse.ArgumentParser) -> None:
    """Mutual TLS between the cluster's services (all three, or none: plain gRPC)."""
    p.add_argument(
        "--tls-cert",
        default=env("TLS_CERT"),
        help="PEM certificate this service presents to the others (mutual TLS)",
    )
    p.add_argument("--tls-key", default=env("TLS_KEY"), help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-ca",
        default=env("TLS_CA"),
        help="PEM CA certificate that must sign every peer's certificate",
    )


def use_tls(a: argparse.Namespace) -> list[str]:
    """Turn on this process's mutual TLS from the flags; returns them for its children."""
    from pathlib import Path

    from services.grpcio import TLSFiles, use_tls

    files = (a.tls_cert, a.tls_key, a.tls_ca)
    if not any(files):
        use_tls(None)
        return []
    if not all(files):
        raise ValueError("mutual TLS needs --tls-cert, --tls-key and --tls-ca together")
    use_tls(TLSFiles(Path(a.tls_cert), Path(a.tls_key), Path(a.tls_ca)))
    return ["--tls-cert", a.tls_cert, "--tls-key", a.tls_key, "--tls-ca", a.tls_ca]


def add_cache_service_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-service", "--cache", dest="cache_service",
                   default=env("CACHE_SERVICE") or env("CACHE_ADDR") or "127.0.0.1:30010",
                   help="the cache service's address, host:port (--cache: the old name; "
                   "STRATA_CACHE_SERVICE)")  # fmt: skip


def add_hicache_args(p: argparse.ArgumentParser) -> None:
    """The KV tiers below L1 (SGLang's flag names)."""
    d = HiCacheConfig()
    p.add_argument("--enable-hierarchical-cache", action="store_true",
                   help="keep pages evicted from L1 in host memory (L2), and in --hicache-"
                   "storage-dir (L3) with --hicache-storage-backend file")  # fmt: skip
    p.add_argument("--hicache-ratio", type=float, default=d.ratio,
                   help="L2 pages per L1 page")  # fmt: skip
    p.add_argument("--hicache-size", type=float, default=d.size_gb,
                   help="L2 size in GB (overrides --hicache-ratio)")  # fmt: skip
    p.add_argument("--hicache-write-policy", default=d.write_policy, choices=WRITE_POLICIES,
                   help="when pages are copied to L2 (and L3): as the cache takes them, "
                   "once reused twice, or on eviction")  # fmt: skip
    p.add_argument("--hicache-storage-backend", default=d.storage_backend or None,
                   choices=["file"], help="L3: page files in --hicache-storage-dir")  # fmt: skip
    p.add_argument("--hicache-storage-dir", default=env("HICACHE_STORAGE_DIR"),
                   help="the L3 directory (shared by every worker of a cluster)")  # fmt: skip
    p.add_argument(
        "--hicache-storage-size",
        type=float,
        default=d.storage_size_gb,
        help="L3 budget in GB (least recently used page files are deleted past it)",
    )
    p.add_argument("--hicache-storage-prefetch-policy", default=d.prefetch_policy,
                   choices=PREFETCH_POLICIES, help="how long a request waits for its L3 "
                   "pages: until a timeout, until they are in, or not at all")  # fmt: skip


def hicache_config(a: argparse.Namespace) -> HiCacheConfig:
    return HiCacheConfig(
        enabled=a.enable_hierarchical_cache, ratio=a.hicache_ratio, size_gb=a.hicache_size,
        write_policy=a.hicache_write_policy, storage_backend=a.hicache_storage_backend or "",
        storage_dir=a.hicache_storage_dir, storage_size_gb=a.hicache_storage_size,
        prefetch_policy=a.hicache_storage_prefetch_policy,
    )  # fmt: skip


def hicache_argv(a: argparse.Namespace) -> list[str]:
    """The same flags again, for a child process."""
    if not a.enable_hierarchical_cache:
        return []
    out = ["--enable-hierarchical-cache", "--hicache-ratio", str(a.hicache_ratio),
           "--hicache-size", str(a.hicache_size), "--hicache-write-policy",
           a.hicache_write_policy, "--hicache-storage-size", str(a.hicache_storage_size),
           "--hicache-storage-prefetch-policy", a.hicache_storage_prefetch_policy]  # fmt: skip
    if a.hicache_storage_backend:
        out += ["--hicache-storage-backend", a.hicache_storage_backend,
                "--hicache-storage-dir", a.hicache_storage_dir]  # fmt: skip
    return out


def model_config(a: argparse.Namespace) -> ModelConfig:
    graphs = 0 if a.disable_cuda_graph else a.cuda_graph_max_bs
    return ModelConfig(a.model_path, a.dtype, a.device, a.quantization, sparse_config(a),
                       a.context_length, a.attention_backend, a.tp_size, graphs)  # fmt: skip


def pool_config(a: argparse.Namespace) -> KVPoolConfig:
    return KVPoolConfig(page_size=a.page_size, num_pages=a.num_pages,
                       mem_fraction=a.mem_fraction_static)  # fmt: skip


def cmd_generate(a: argparse.Namespace) -> int:
    from strata.engine.generate import generate
    from strata.engine.runner import ModelRunner
    from strata.tokenizer import IncrementalDetokenizer, chat_prompt_ids

    runner = ModelRunner.from_config(model_config(a), pool_config(a))
    tok = runner.tokenizer
    ids = chat_prompt_ids(tok, [{"role": "user", "content": a.prompt}])
    detok = IncrementalDetokenizer(tok)
    stop = set(runner.spec.eos_token_ids) | {tok.eos_token_id}
    start, n = time.perf_counter(), 0
    for token in generate(runner, ids, a.max_new_tokens, a.temperature, tuple(stop), a.seed):
        n += 1
        if token in stop:
            break
        sys.stdout.write(detok.push(token))
        sys.stdout.flush()
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    log.info("%d tokens in %.2fs (%.1f tok/s)", n, elapsed, n / max(elapsed, 1e-9))
    return 0


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=env("HOST") or "127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=int(env("PORT") or 30000), help="port (REST)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name the API reports (default: the model path)")  # fmt: skip
    p.add_argument("--grpc-port", type=int, default=0,
                   help="port of the gRPC strata.v1.Gateway (0: --port + 1; -1: off)")  # fmt: skip
    p.add_argument("--disable-radix-cache", action="store_true",
                   help="no prefix cache: every prompt is computed in full")  # fmt: skip
    p.add_argument("--max-running-requests", type=int, default=64,
                   help="requests decoding at once (the batch)")  # fmt: skip
    p.add_argument("--chunked-prefill-size", "--max-batch-tokens", dest="max_batch_tokens",
                   type=int, default=512,
                   help="tokens per step: decode tokens plus prefill chunks")  # fmt: skip
    p.add_argument(
        "--schedule-policy",
        default="lpm",
        choices=("lpm", "fcfs"),
        help="waiting requests: longest cached prefix first, or arrival order",
    )
    p.add_argument(
        "--random-seed",
        type=int,
        default=None,
        help="seed the sampler of requests that give no seed of their own",
    )
    p.add_argument("--max-queued-requests", type=int, default=1024,
                   help="requests waiting beyond --max-running-requests; past that, new "
                   "requests get 429 (gRPC RESOURCE_EXHAUSTED)")  # fmt: skip
    p.add_argument("--request-timeout", type=float, default=0.0,
                   help="seconds a request may run from arrival, then it is aborted with an "
                   "error saying so (0: no limit)")  # fmt: skip
    p.add_argument("--api-key", default=env("API_KEY"),
                   help="REST and gRPC callers must send `Authorization: Bearer KEY` "
                   "(default: $STRATA_API_KEY; none: open)")  # fmt: skip
    p.add_argument(
        "--protect-health",
        action="store_true",
        help="with --api-key, /health, /metrics and gRPC health need the key too",
    )


def add_routing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--local-prefill-tokens", type=int, default=256,
                   help="conditional disaggregation: a prompt whose part not cached on its "
                   "decode worker is at most this many tokens is prefilled there, with no "
                   "KV transfer (-1: always use a prefill worker)")  # fmt: skip


def cmd_bench(a: argparse.Namespace) -> int:
    from strata.bench.cli import cmd_bench as run

    return run(a)


def seed_sampler(a: argparse.Namespace) -> None:
    """--random-seed: the process-wide generator that unseeded requests sample with."""
    if a.random_seed is not None:
        import torch

        torch.manual_seed(a.random_seed)


def cmd_serve(a: argparse.Namespace) -> int:
    from launch.serve import serve

    serve(
        model_config(a),
        pool_config(a),
        sched_config(a),
        ServerConfig(
            a.host,
            a.port,
            a.served_model_name,
            a.log_level,
            a.grpc_port,
            a.api_key,
            a.protect_health,
        ),
        hicache_config(a),
        a.random_seed,
    )
    return 0


def cmd_cache(a: argparse.Namespace) -> int:
    import asyncio

    from services.cache.server import serve

    use_tls(a)
    asyncio.run(serve(a.host, a.port, a.hicache_storage_dir, a.hicache_storage_size))
    return 0


def sched_config(a: argparse.Namespace) -> SchedulerConfig:
    return SchedulerConfig(not a.disable_radix_cache, a.max_running_requests, a.max_batch_tokens,
                           a.max_queued_requests, a.request_timeout, a.schedule_policy)  # fmt: skip


def cmd_worker(a: argparse.Namespace) -> int:
    from launch.serve import serve_worker

    seed_sampler(a)
    use_tls(a)
    serve_worker(a.command, model_config(a), pool_config(a), sched_config(a), hicache_config(a),
                 a.host, a.port, a.cache_service, a.worker_id, a.shutdown_grace)  # fmt: skip
    return 0


def cmd_gateway(a: argparse.Namespace) -> int:
    from launch.serve import serve_gateway

    server = ServerConfig(
        a.host, a.port, a.served_model_name, a.log_level, a.grpc_port, a.api_key, a.protect_health
    )
    use_tls(a)
    decode = addresses(a.decode)
    bound = len(decode) * (a.max_running_requests + a.max_queued_requests)
    serve_gateway(model_config(a), server, a.cache_service, decode, addresses(a.prefill),
                  a.local_prefill_tokens, bound)  # fmt: skip
    return 0


def addresses(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_up(a: argparse.Namespace) -> int:
    from launch.up import up

    if a.prefill < 0 or a.decode < 1:
        raise ValueError("--prefill must be >= 0 and --decode >= 1")
    model_args = ["--dtype", a.dtype, "--device", a.device, "--quantization", a.quantization,
                  "--page-size", str(a.page_size), "--attention-backend", a.attention_backend,
                  "--tp-size", str(a.tp_size), *sparse_argv(a), "--cuda-graph-max-bs",
                  str(0 if a.disable_cuda_graph else a.cuda_graph_max_bs)]  # fmt: skip
    if a.model_path:
        model_args += ["--model-path", a.model_path]
    if a.context_length:
        model_args += ["--context-length", str(a.context_length)]
    if a.mem_fraction_static is not None:  # every worker of this machine takes its share
        share = a.mem_fraction_static / (a.prefill + a.decode)
        model_args += ["--mem-fraction-static", str(share)]
    worker_args = ["--num-pages", str(a.num_pages),
                   "--max-running-requests", str(a.max_running_requests),
                   "--chunked-prefill-size", str(a.max_batch_tokens),
                   "--max-queued-requests", str(a.max_queued_requests),
                   "--request-timeout", str(a.request_timeout),
                   "--schedule-policy", a.schedule_policy]  # fmt: skip
    if a.random_seed is not None:
        worker_args += ["--random-seed", str(a.random_seed)]
    if a.disable_radix_cache:
        worker_args.append("--disable-radix-cache")
    cache_args = []
    if a.tp_size > 1 and a.enable_hierarchical_cache and not a.disable_hierarchical_cache:
        log.warning("--tp-size %d: the KV tiers below L1 are off (not yet sharded by rank)",
                    a.tp_size)  # fmt: skip
        a.disable_hierarchical_cache = True
    if a.disable_hierarchical_cache:
        a.enable_hierarchical_cache, a.hicache_storage_backend = False, None
    elif a.enable_hierarchical_cache and a.hicache_storage_backend == "file":
        a.hicache_storage_dir = a.hicache_storage_dir or str(cache_dir() / "kv-store")
        cache_args = ["--hicache-storage-dir", a.hicache_storage_dir,
                      "--hicache-storage-size", str(a.hicache_storage_size)]  # fmt: skip
    hicache_config(a)  # refuse bad flags here, before any process starts
    worker_args += hicache_argv(a)
    tls = use_tls(a)  # this process checks the services' health over it too
    worker_args += tls
    cache_args += tls
    gateway_args = ["--local-prefill-tokens", str(a.local_prefill_tokens),
                    "--max-running-requests", str(a.max_running_requests),
                    "--max-queued-requests", str(a.max_queued_requests), *tls]  # fmt: skip
    if a.api_key:  # to the gateway through the environment, not its command line (ps)
        os.environ["STRATA_API_KEY"] = a.api_key
        gateway_args += ["--protect-health"] if a.protect_health else []
    return up(a.host, a.port, a.grpc_port, a.prefill, a.decode, model_args, worker_args,
              gateway_args, cache_args, a.log_level)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a reply to one prompt, streamed")
    g.add_argument("prompt", help="the user message")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--seed", type=int, default=None, help="for reproducible sampling")
    add_model_args(g)
    g.set_defaults(func=cmd_generate)
    s = sub.add_parser("serve", help="run the colocated server (REST, OpenAI-compatible)")
    add_model_args(s)
    add_server_args(s)
    add_hicache_args(s)
    s.set_defaults(func=cmd_serve)
    u = sub.add_parser("up", help="run the split cluster locally (cache, workers, gateway)")
    add_model_args(u)
    add_server_args(u)
    add_routing_args(u)
    u.add_argument("--prefill", type=int, default=1, help="prefill workers (0: decode "
                   "workers prefill their own prompts)")  # fmt: skip
    u.add_argument("--decode", type=int, default=1, help="decode workers")
    add_hicache_args(u)
    u.add_argument("--disable-hierarchical-cache", action="store_true",
                   help="workers keep L1 only (the cluster default is L1 + L2 + a shared L3 "
                   "store in ~/.cache/strata/kv-store)")  # fmt: skip
    add_tls_args(u)
    u.set_defaults(func=cmd_up, enable_hierarchical_cache=True, hicache_storage_backend="file")
    for role, port in (("prefill", 30030), ("decode", 30020)):
        d = sub.add_parser(role, help=f"run one {role} worker (gRPC strata.v1.{role.title()})")
        add_model_args(d)
        add_server_args(d)
        add_hicache_args(d)
        add_cache_service_arg(d)
        d.add_argument("--worker-id", default=None, help="name at the cache service "
                       "(default host:port: the address the gateway dials)")  # fmt: skip
        d.add_argument("--shutdown-grace", type=float, default=10.0,
                       help="seconds in-flight calls get to finish on SIGTERM")  # fmt: skip
        add_tls_args(d)
        d.set_defaults(func=cmd_worker, port=int(env(f"{role.upper()}_PORT") or port))
    w = sub.add_parser("gateway", help="run the gateway over the workers (REST + gRPC)")
    add_model_args(w)
    add_server_args(w)
    add_routing_args(w)
    add_cache_service_arg(w)
    w.add_argument("--decode", default=env("DECODE_ADDRS") or "127.0.0.1:30020",
                   help="comma-separated decode worker addresses")  # fmt: skip
    w.add_argument("--prefill", default=env("PREFILL_ADDRS") or "",
                   help="comma-separated prefill worker addresses (none: decode workers "
                   "prefill)")  # fmt: skip
    add_tls_args(w)
    w.set_defaults(func=cmd_gateway)
    c = sub.add_parser("cache", help="run the cache service (the cluster's radix trees)")
    c.add_argument("--host", default=env("CACHE_HOST") or "127.0.0.1", help="address to listen on")
    c.add_argument("--port", type=int, default=int(env("CACHE_PORT") or 30010), help="gRPC port")
    c.add_argument(
        "--hicache-storage-dir",
        default=env("HICACHE_STORAGE_DIR"),
        help="the workers' shared L3 directory: indexed here, evicted LRU",
    )
    c.add_argument("--hicache-storage-size", type=float, default=HiCacheConfig().storage_size_gb,
                   help="L3 budget in GB")  # fmt: skip
    c.add_argument("--log-level", default="info", help="debug, info, warning or error")
    add_tls_args(c)
    c.set_defaults(func=cmd_cache)
    b = sub.add_parser("bench", help="benchmark an OpenAI-compatible server with a workload")
    add_bench_args(b)
    b.add_argument("--log-level", default="warning", help="debug, info, warning or error")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from launch.up import die_with_parent

    die_with_parent()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except (ValueError, OSError) as exc:  # load and input errors: one clear line, no trace
        print(f"strata: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
