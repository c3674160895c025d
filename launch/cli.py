"""The `strata` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

from launch.args import (
    add_cache_service_arg,
    add_hicache_args,
    add_model_args,
    add_routing_args,
    add_server_args,
    add_tls_args,
    hicache_argv,
    hicache_config,
    model_config,
    pool_config,
    sched_config,
    server_config,
    sparse_argv,
    use_tls,
)
from launch.kube import add_kube_parser
from strata.bench.cli import add_bench_args
from strata.config import HiCacheConfig, cache_dir, env
from strata.engine.memory import worker_share

log = logging.getLogger("strata")


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
        server_config(a),
        hicache_config(a),
        a.random_seed,
    )
    return 0


def cmd_cache(a: argparse.Namespace) -> int:
    import asyncio

    from services.cache.server import serve

    use_tls(a)
    store = a.hicache_storage_dir, a.hicache_storage_size, a.hicache_storage_url
    asyncio.run(serve(a.host, a.port, *store))
    return 0


def cmd_worker(a: argparse.Namespace) -> int:
    from launch.serve import serve_worker

    seed_sampler(a)
    use_tls(a)
    serve_worker(
        a.command,
        model_config(a),
        pool_config(a),
        sched_config(a),
        hicache_config(a),
        a.host,
        a.port,
        a.cache_service,
        a.worker_id,
        a.shutdown_grace,
    )
    return 0


def cmd_gateway(a: argparse.Namespace) -> int:
    from launch.serve import serve_gateway

    server = server_config(a)
    use_tls(a)
    serve_gateway(
        model_config(a),
        server,
        a.cache_service,
        addresses(a.decode),
        addresses(a.prefill),
        a.local_prefill_tokens,
        a.max_running_requests + a.max_queued_requests,
        a.migration_limit,
        a.discovery,
    )
    return 0


def addresses(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_up(a: argparse.Namespace) -> int:
    from launch.up import up

    if a.prefill < 0 or a.decode < 1:
        raise ValueError("--prefill must be >= 0 and --decode >= 1")
    model_args = _up_model_argv(a)
    worker_args = _up_worker_argv(a)
    cache_args = _up_tiers(a)
    hicache_config(a)  # refuse bad flags here, before any process starts
    worker_args += hicache_argv(a)
    tls = use_tls(a)  # this process checks the services' health over it too
    worker_args += tls
    cache_args += tls
    gateway_args = [
        "--local-prefill-tokens",
        str(a.local_prefill_tokens),
        "--migration-limit",
        str(a.migration_limit),
        "--max-running-requests",
        str(a.max_running_requests),
        "--max-queued-requests",
        str(a.max_queued_requests),
        "--tool-call-parser",
        a.tool_call_parser,
        *tls,
    ]
    if a.api_key:  # to the gateway through the environment, not its command line (ps)
        os.environ["STRATA_API_KEY"] = a.api_key
        gateway_args += ["--protect-health"] if a.protect_health else []
    return up(
        a.host,
        a.port,
        a.grpc_port,
        a.prefill,
        a.decode,
        model_args,
        worker_args,
        gateway_args,
        cache_args,
        a.log_level,
    )


def _up_model_argv(a: argparse.Namespace) -> list[str]:
    """The model flags of every worker `strata up` starts, with each its memory share."""
    out = [
        "--dtype",
        a.dtype,
        "--device",
        a.device,
        "--quantization",
        a.quantization,
        "--page-size",
        str(a.page_size),
        "--attention-backend",
        a.attention_backend,
        "--tp-size",
        str(a.tp_size),
        *sparse_argv(a),
        "--cuda-graph-max-bs",
        str(0 if a.disable_cuda_graph else a.cuda_graph_max_bs),
    ]
    if a.model_path:
        out += ["--model-path", a.model_path]
    if a.context_length:
        out += ["--context-length", str(a.context_length)]
    if a.num_pages is not None:
        return out + ["--num-pages", str(a.num_pages)]
    # one budget for this host, measured once, shared by the workers (engine.memory)
    ranks = (a.prefill + a.decode) * a.tp_size
    share = worker_share(a.device, a.mem_fraction_static, a.memory_budget_gb, ranks)
    return out + ["--memory-budget-gb", f"{share * a.tp_size / 1e9:.3f}"]


def _up_worker_argv(a: argparse.Namespace) -> list[str]:
    out = [
        "--max-running-requests",
        str(a.max_running_requests),
        "--chunked-prefill-size",
        str(a.max_batch_tokens),
        "--max-queued-requests",
        str(a.max_queued_requests),
        "--request-timeout",
        str(a.request_timeout),
        "--schedule-policy",
        a.schedule_policy,
        "--speculative-algorithm",
        sched_config(a).speculative_algorithm,
        "--speculative-num-draft-tokens",
        str(a.speculative_num_draft_tokens),
        "--session-pages-fraction",
        str(a.session_pages_fraction),
    ]
    if a.random_seed is not None:
        out += ["--random-seed", str(a.random_seed)]
    if a.disable_radix_cache:
        out.append("--disable-radix-cache")
    return out


def _up_tiers(a: argparse.Namespace) -> list[str]:
    """Settle the cluster's KV tiers in `a` (L1 + L2 + a shared L3 directory unless turned
    off); returns the cache service's flags for L3."""
    if a.tp_size > 1 and a.enable_hierarchical_cache and not a.disable_hierarchical_cache:
        log.warning(
            "--tp-size %d: the KV tiers below L1 are off (not yet sharded by rank)", a.tp_size
        )
        a.disable_hierarchical_cache = True
    if a.disable_hierarchical_cache:
        a.enable_hierarchical_cache, a.hicache_storage_backend = False, None
        return []
    if a.enable_hierarchical_cache and a.hicache_storage_backend == "redis":
        return ["--hicache-storage-url", a.hicache_storage_url or ""]
    if not (a.enable_hierarchical_cache and a.hicache_storage_backend == "file"):
        return []
    a.hicache_storage_dir = a.hicache_storage_dir or str(cache_dir() / "kv-store")
    return [
        "--hicache-storage-dir",
        a.hicache_storage_dir,
        "--hicache-storage-size",
        str(a.hicache_storage_size),
    ]


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
    _add_up_parser(sub)
    for role, port in (("prefill", 30030), ("decode", 30020)):
        _add_worker_parser(sub, role, port)
    _add_gateway_parser(sub)
    _add_cache_parser(sub)
    add_kube_parser(sub)
    b = sub.add_parser("bench", help="benchmark an OpenAI-compatible server with a workload")
    add_bench_args(b)
    b.add_argument("--log-level", default="warning", help="debug, info, warning or error")
    b.set_defaults(func=cmd_bench)
    return parser


def _add_up_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    u = sub.add_parser("up", help="run the split cluster locally (cache, workers, gateway)")
    add_model_args(u)
    add_server_args(u)
    add_routing_args(u)
    u.add_argument(
        "--prefill",
        type=int,
        default=1,
        help="prefill workers (0: decode workers prefill their own prompts)",
    )
    u.add_argument("--decode", type=int, default=1, help="decode workers")
    add_hicache_args(u)
    u.add_argument(
        "--disable-hierarchical-cache",
        action="store_true",
        help="workers keep L1 only (the cluster default is L1 + L2 + a shared L3 "
        "store in ~/.cache/strata/kv-store)",
    )
    add_tls_args(u)
    u.set_defaults(func=cmd_up, enable_hierarchical_cache=True, hicache_storage_backend="file")


def _add_worker_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], role: str, port: int
) -> None:
    d = sub.add_parser(role, help=f"run one {role} worker (gRPC strata.v1.{role.title()})")
    add_model_args(d)
    add_server_args(d)
    add_hicache_args(d)
    add_cache_service_arg(d)
    d.add_argument(
        "--worker-id",
        default=None,
        help="name at the cache service (default host:port: the address the gateway dials)",
    )
    d.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="seconds in-flight calls get to finish on SIGTERM",
    )
    add_tls_args(d)
    d.set_defaults(func=cmd_worker, port=int(env(f"{role.upper()}_PORT") or port))


def _add_gateway_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    w = sub.add_parser("gateway", help="run the gateway over the workers (REST + gRPC)")
    add_model_args(w)
    add_server_args(w)
    add_routing_args(w)
    add_cache_service_arg(w)
    w.add_argument(
        "--decode",
        default=env("DECODE_ADDRS") if env("DECODE_ADDRS") is not None else "127.0.0.1:30020",
        help="comma-separated decode workers: host:port, or dns:NAME:PORT for every address "
        "a DNS name has (a Kubernetes headless Service), followed as it changes",
    )
    w.add_argument(
        "--prefill",
        default=env("PREFILL_ADDRS") or "",
        help="comma-separated prefill workers, as --decode (none: decode workers prefill)",
    )
    w.add_argument(
        "--discovery",
        default=env("DISCOVERY") or "static",
        choices=["static", "registry"],
        help="registry: also route to the workers registered at the cache service (each "
        "renews its entry every second; one silent for 3 s leaves routing)",
    )
    add_tls_args(w)
    w.set_defaults(func=cmd_gateway)


def _add_cache_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("cache", help="run the cache service (the cluster's radix trees)")
    c.add_argument("--host", default=env("CACHE_HOST") or "127.0.0.1", help="address to listen on")
    c.add_argument("--port", type=int, default=int(env("CACHE_PORT") or 30010), help="gRPC port")
    c.add_argument(
        "--hicache-storage-dir",
        default=env("HICACHE_STORAGE_DIR"),
        help="the workers' shared L3 directory: indexed here, evicted LRU",
    )
    c.add_argument(
        "--hicache-storage-url",
        default=env("HICACHE_STORAGE_URL"),
        help="the workers' shared L3 in Redis/Valkey (redis://host:port/db): asked for "
        "routing; Redis evicts",
    )
    c.add_argument(
        "--hicache-storage-size",
        type=float,
        default=HiCacheConfig().storage_size_gb,
        help="L3 budget in GB",
    )
    c.add_argument("--log-level", default="info", help="debug, info, warning or error")
    add_tls_args(c)
    c.set_defaults(func=cmd_cache)


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
