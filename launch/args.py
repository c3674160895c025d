"""The `strata` command line's flags: each group's arguments, and the configs (and argv for
child processes) built from them."""

from __future__ import annotations

import argparse

from gateway.tool_formats import FORMATS
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
    default_sparse,
    env,
)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", default=None, help="HF checkpoint folder or GGUF file")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument(
        "--quantization",
        default="auto",
        choices=QUANTIZATIONS,
        help="int4: group-wise weight-only int4 linear layers (a GGUF file's Q4_1 "
        "blocks served as they are); auto: int4 for a GGUF model with Q4_1 blocks "
        "(the embedded model) where strata's int4 kernels run, else none",
    )
    _add_memory_args(p)
    p.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="cap the context below the model's max_position_embeddings",
    )
    p.add_argument(
        "--attention-backend",
        default="auto",
        choices=ATTENTION_BACKENDS,
        help="attention kernels: triton (CUDA), cpu (C kernels), torch (reference "
        "ops); auto picks triton on CUDA and cpu on CPU",
    )
    p.add_argument(
        "--tp-size",
        "--tp",
        dest="tp_size",
        type=int,
        default=1,
        help="tensor parallelism: run the model over this many ranks (processes on CPU, GPUs "
        "on CUDA), each with its share of heads, MLP and vocabulary",
    )
    p.add_argument(
        "--cuda-graph-max-bs",
        type=int,
        default=ModelConfig.cuda_graph_max_bs,
        help="CUDA: decode batches of up to this many sequences replay graphs "
        "captured at start (one per batch-size bucket); 0: never",
    )
    p.add_argument(
        "--disable-cuda-graph",
        action="store_true",
        help="CUDA: every step runs eagerly (--cuda-graph-max-bs 0)",
    )
    p.add_argument("--log-level", default="warning", help="debug, info, warning or error")
    _add_sparse_args(p)


def _add_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument(
        "--num-pages",
        type=int,
        default=None,
        help="KV pages in the device pool (L1), page-size tokens each (default: "
        "as many as the memory budget holds)",
    )
    p.add_argument(
        "--mem-fraction-static",
        type=float,
        default=None,
        help="the memory budget (weights, runtime and KV tiers) as a fraction of "
        "the memory available at start (CPU: host RAM within the cgroup's limit, "
        "default 0.7; CUDA: the GPU's, default 0.85)",
    )
    p.add_argument(
        "--memory-budget-gb",
        type=float,
        default=None,
        help="the memory budget in GB (overrides --mem-fraction-static; strata up "
        "gives each worker its share of one budget for the host)",
    )


def _add_sparse_args(p: argparse.ArgumentParser) -> None:
    d = SparseConfig()
    p.add_argument(
        "--attention-sparsity-threshold",
        type=float,
        default=None,
        help="sparse decode skips a page whose bound on the attention logit is "
        f"more than {SPARSE_SPREAD} ln(1/threshold) nats under the best page's "
        f"({-d.min_score:.1f} at {d.threshold}, the default on CPU), per step, "
        "layer and KV head; 0: dense attention (the default on CUDA)",
    )
    p.add_argument(
        "--sparse-min-context",
        type=int,
        default=d.min_context,
        help="tokens: shorter sequences decode densely",
    )
    p.add_argument(
        "--sparse-budget",
        type=float,
        default=d.budget,
        help="pages sparse decode keeps at most: a count (>= 1) or a fraction of "
        "the context's pages (< 1); 0: no cap",
    )
    p.add_argument(
        "--sparse-dense-layers",
        type=int,
        default=d.dense_layers,
        help="the first layers always decode densely",
    )
    p.add_argument(
        "--sparse-demote-after",
        type=int,
        default=d.demote_after,
        help="with --enable-hierarchical-cache (CPU): a running request's page no "
        "sparse layer kept for this many steps may move to L2 when L1 runs short, "
        "and comes back when selected; 0: never",
    )


def sparse_config(a: argparse.Namespace) -> SparseConfig:
    threshold = a.attention_sparsity_threshold
    if threshold is None:
        threshold = default_sparse(a.device).threshold
    return SparseConfig(
        threshold=threshold,
        min_context=a.sparse_min_context,
        budget=a.sparse_budget,
        dense_layers=a.sparse_dense_layers,
        demote_after=a.sparse_demote_after,
    )


def sparse_argv(a: argparse.Namespace) -> list[str]:
    return [
        "--attention-sparsity-threshold",
        str(sparse_config(a).threshold),
        "--sparse-min-context",
        str(a.sparse_min_context),
        "--sparse-budget",
        str(a.sparse_budget),
        "--sparse-dense-layers",
        str(a.sparse_dense_layers),
        "--sparse-demote-after",
        str(a.sparse_demote_after),
    ]


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
    p.add_argument(
        "--cache-service",
        "--cache",
        dest="cache_service",
        default=env("CACHE_SERVICE") or env("CACHE_ADDR") or "127.0.0.1:30010",
        help="the cache service's address, host:port (--cache: the old name; STRATA_CACHE_SERVICE)",
    )


def add_hicache_args(p: argparse.ArgumentParser) -> None:
    """The KV tiers below L1 (SGLang's flag names)."""
    d = HiCacheConfig()
    p.add_argument(
        "--enable-hierarchical-cache",
        action="store_true",
        help="keep pages evicted from L1 in host memory (L2), and in --hicache-"
        "storage-dir (L3) with --hicache-storage-backend file",
    )
    p.add_argument("--hicache-ratio", type=float, default=d.ratio, help="L2 pages per L1 page")
    p.add_argument(
        "--hicache-size",
        type=float,
        default=d.size_gb,
        help="L2 size in GB (overrides --hicache-ratio)",
    )
    p.add_argument(
        "--hicache-write-policy",
        default=d.write_policy,
        choices=WRITE_POLICIES,
        help="when pages are copied to L2 (and L3): as the cache takes them, "
        "once reused twice, or on eviction",
    )
    p.add_argument(
        "--hicache-storage-backend",
        default=d.storage_backend or None,
        choices=["file", "redis"],
        help="L3: page files in --hicache-storage-dir, or keys in Redis/Valkey at "
        "--hicache-storage-url",
    )
    p.add_argument(
        "--hicache-storage-dir",
        default=env("HICACHE_STORAGE_DIR"),
        help="the L3 directory (shared by every worker of a cluster)",
    )
    p.add_argument(
        "--hicache-storage-url",
        default=env("HICACHE_STORAGE_URL"),
        help="the L3 Redis/Valkey: redis://[:password@]host:port/db (rediss:// for TLS); "
        "its maxmemory and LRU policy are the L3 budget",
    )
    p.add_argument(
        "--hicache-storage-size",
        type=float,
        default=d.storage_size_gb,
        help="L3 budget in GB (least recently used page files are deleted past it)",
    )
    p.add_argument(
        "--hicache-storage-prefetch-policy",
        default=d.prefetch_policy,
        choices=PREFETCH_POLICIES,
        help="how long a request waits for its L3 "
        "pages: until a timeout, until they are in, or not at all",
    )


def hicache_config(a: argparse.Namespace) -> HiCacheConfig:
    return HiCacheConfig(
        enabled=a.enable_hierarchical_cache,
        ratio=a.hicache_ratio,
        size_gb=a.hicache_size,
        write_policy=a.hicache_write_policy,
        storage_backend=a.hicache_storage_backend or "",
        storage_dir=a.hicache_storage_dir,
        storage_url=a.hicache_storage_url,
        storage_size_gb=a.hicache_storage_size,
        prefetch_policy=a.hicache_storage_prefetch_policy,
    )


def hicache_argv(a: argparse.Namespace) -> list[str]:
    """The same flags again, for a child process."""
    if not a.enable_hierarchical_cache:
        return []
    out = [
        "--enable-hierarchical-cache",
        "--hicache-ratio",
        str(a.hicache_ratio),
        "--hicache-size",
        str(a.hicache_size),
        "--hicache-write-policy",
        a.hicache_write_policy,
        "--hicache-storage-size",
        str(a.hicache_storage_size),
        "--hicache-storage-prefetch-policy",
        a.hicache_storage_prefetch_policy,
    ]
    if a.hicache_storage_backend == "file":
        out += ["--hicache-storage-backend", "file", "--hicache-storage-dir", a.hicache_storage_dir]
    elif a.hicache_storage_backend == "redis":
        out += [
            "--hicache-storage-backend",
            "redis",
            "--hicache-storage-url",
            a.hicache_storage_url,
        ]
    return out


def model_config(a: argparse.Namespace) -> ModelConfig:
    graphs = 0 if a.disable_cuda_graph else a.cuda_graph_max_bs
    return ModelConfig(
        a.model_path,
        a.dtype,
        a.device,
        a.quantization,
        sparse_config(a),
        a.context_length,
        a.attention_backend,
        a.tp_size,
        graphs,
    )


def pool_config(a: argparse.Namespace) -> KVPoolConfig:
    return KVPoolConfig(
        page_size=a.page_size,
        num_pages=a.num_pages,
        mem_fraction=a.mem_fraction_static,
        memory_budget_gb=a.memory_budget_gb,
    )


def server_config(a: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        a.host,
        a.port,
        a.served_model_name,
        a.log_level,
        a.grpc_port,
        a.api_key,
        a.protect_health,
        a.tool_call_parser,
    )


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=env("HOST") or "127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=int(env("PORT") or 30000), help="port (REST)")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model name the API reports (default: the model path)",
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        default=0,
        help="port of the gRPC strata.v1.Gateway (0: --port + 1; -1: off)",
    )
    add_scheduler_args(p)
    p.add_argument(
        "--api-key",
        default=env("API_KEY"),
        help="REST and gRPC callers must send `Authorization: Bearer KEY` "
        "(default: $STRATA_API_KEY; none: open)",
    )
    p.add_argument(
        "--protect-health",
        action="store_true",
        help="with --api-key, /health, /metrics and gRPC health need the key too",
    )
    p.add_argument(
        "--tool-call-parser",
        choices=sorted(FORMATS),
        default="json",
        help="the chat API's tools: json (listed in a system note, called with a bare JSON "
        "object; any model) or the model's own format through its chat template: hermes / "
        "qwen25 (<tool_call> blocks), llama3, mistral ([TOOL_CALLS])",
    )


def add_scheduler_args(p: argparse.ArgumentParser) -> None:
    """How the engine batches and schedules its requests."""
    p.add_argument(
        "--disable-radix-cache",
        action="store_true",
        help="no prefix cache: every prompt is computed in full",
    )
    p.add_argument(
        "--max-running-requests", type=int, default=64, help="requests decoding at once (the batch)"
    )
    p.add_argument(
        "--chunked-prefill-size",
        "--max-batch-tokens",
        dest="max_batch_tokens",
        type=int,
        default=512,
        help="tokens per step: decode tokens plus prefill chunks",
    )
    p.add_argument(
        "--schedule-policy",
        default="lpm",
        choices=("lpm", "fcfs"),
        help="waiting requests: longest cached prefix first, or arrival order",
    )
    p.add_argument(
        "--speculative-algorithm",
        default=None,
        type=str.lower,  # SGLang spells it NGRAM
        choices=("none", "ngram"),
        help="ngram: greedy requests propose the tokens that followed the latest earlier "
        "match of their last tokens (prompt lookup) and keep what the model verifies "
        "(default: ngram on CPU; none on CUDA, where a step that verifies drafts would run "
        "eagerly beside decode's CUDA graphs: not measured yet)",
    )
    p.add_argument(
        "--speculative-num-draft-tokens", type=int, default=4, help="tokens per n-gram draft"
    )
    p.add_argument(
        "--session-pages-fraction",
        type=float,
        default=0.5,
        help="of the L1 pool, what open sessions may pin together (past it the least "
        "recently used session's pages may leave L1)",
    )
    p.add_argument(
        "--random-seed",
        type=int,
        default=None,
        help="seed the sampler of requests that give no seed of their own",
    )
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=1024,
        help="requests waiting beyond --max-running-requests; past that, new "
        "requests get 429 (gRPC RESOURCE_EXHAUSTED)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=0.0,
        help="seconds a request may run from arrival, then it is aborted with an "
        "error saying so (0: no limit)",
    )


def add_routing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--local-prefill-tokens",
        type=int,
        default=256,
        help="conditional disaggregation: a prompt whose part not cached on its "
        "decode worker is at most this many tokens is prefilled there, with no "
        "KV transfer (-1: always use a prefill worker)",
    )
    p.add_argument(
        "--migration-limit",
        type=int,
        default=3,
        help="a stream cut mid-generation (its decode worker died) goes on on another "
        "decode worker after the tokens already sent, at most this many times per request; "
        "then the client gets an error event (0: never migrate)",
    )


def sched_config(a: argparse.Namespace) -> SchedulerConfig:
    spec = a.speculative_algorithm
    if spec is None:
        spec = "none" if getattr(a, "device", "cpu").startswith("cuda") else "ngram"
    return SchedulerConfig(
        not a.disable_radix_cache,
        a.max_running_requests,
        a.max_batch_tokens,
        a.max_queued_requests,
        a.request_timeout,
        a.schedule_policy,
        spec,
        a.speculative_num_draft_tokens,
        a.session_pages_fraction,
    )
