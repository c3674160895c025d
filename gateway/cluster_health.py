"""The split cluster's /health: every worker's figures asked at once (a worker that failed
its last health check is not asked) and added up, with the cache service's L3 store."""

from __future__ import annotations

import asyncio
from dataclasses import fields
from typing import Any

import grpc

from gateway.backend import load_json
from gateway.workers import WorkerSet
from services.convert import tier_stats_from_proto, tree_stats_from_proto
from strata.cache.results import TreeStats
from strata.proto.v1 import cache_pb2, worker_pb2

RPC_TIMEOUT = 10.0
LOAD_TIMEOUT = 3.0  # a worker's figures for /health (answered between its engine's steps)


async def cluster_health(w: WorkerSet, model: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The cluster's /health body; extra: the gateway's own figures."""
    replies = await asyncio.gather(
        *(_worker_health(t, "decode", w.decode_stub(t), w.healthy[t]) for t in w.decode),
        *(_worker_health(t, "prefill", w.prefill_stub(t), w.healthy[t]) for t in w.prefill),
    )
    workers = [info for info, _ in replies]
    ok = [(info, got) for info, got in replies if got is not None]
    received = [load for info, (_, _, load) in ok if info["role"] == "decode"]
    trees = [stats for _, (stats, _, _) in ok if stats is not None]
    tiers = [t for _, (_, t, _) in ok if t is not None]
    l3_store = await _l3_store(w.cache())
    return {
        "status": "ok" if len(ok) == len(workers) else "degraded",
        "model": model,
        **load_json(
            sum(i["running_requests"] for i, _ in ok if i["role"] == "decode"),
            sum(i["waiting_requests"] for i, _ in ok if i["role"] == "decode"),
            sum(i["pages_total"] for i, _ in ok),
            sum(i["pages_free"] for i, _ in ok),
            sum_stats(trees) if trees else None,
            sum_tiers(tiers) if tiers else None,
            l3_store,
        ),
        "kv_transfer": transfer_json(
            sum(r.transfers for r in received),
            sum(r.transfer_bytes for r in received),
            sum(r.transfer_seconds for r in received),
        ),
        "cache_service": "ok" if l3_store is not None else "unreachable",
        **extra,
        "workers": workers,
    }


def transfer_json(transfers: int, nbytes: int, seconds: float) -> dict[str, Any]:
    return {
        "transfers": transfers,
        "bytes": nbytes,
        "seconds": round(seconds, 6),
        "gb_per_s": round(nbytes / seconds / 1e9, 3) if seconds else 0.0,
    }


def sum_stats(stats: list[TreeStats]) -> TreeStats:
    """The cluster's view: counts add up; rates are recomputed from the sums."""
    total = {f.name: sum(getattr(s, f.name) for s in stats) for f in fields(TreeStats)}
    shared = total["shared_prefix_count"]
    depth = sum(s.avg_sharing_depth * s.shared_prefix_count for s in stats)
    total["avg_sharing_depth"] = depth / shared if shared else 0.0
    prompt = total["prompt_tokens"]
    total["hit_rate"] = total["cached_tokens"] / prompt if prompt else 0.0
    return TreeStats(**total)


def sum_tiers(tiers: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' tier figures added up (L3 is shared: its own figures come separately)."""
    l3 = [t["l3"] for t in tiers if t["l3"] is not None]
    return {
        "l2": {k: sum(t["l2"][k] for t in tiers) for k in tiers[0]["l2"]},
        "l3": {k: sum(x[k] for x in l3) for k in l3[0]} if l3 else None,
        "bytes_moved": {
            k: sum(t["bytes_moved"].get(k, 0) for t in tiers) for k in tiers[0]["bytes_moved"]
        },
        "write_policy": tiers[0]["write_policy"],
    }


async def _worker_health(
    target: str, role: str, stub: Any, healthy: bool
) -> tuple[dict[str, Any], Any]:
    """One worker's /health entry, and (its tree stats, tier stats, Load reply) if it answered
    (one that failed its last health check is not asked: a hung worker would hold /health)."""
    try:
        if not healthy:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, None, None, "failed its last health check"
            )
        load = await stub.Load(worker_pb2.LoadRequest(), timeout=LOAD_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        return {
            "worker": target,
            "role": role,
            "status": "unreachable",
            "error": exc.details(),
        }, None
    stats = tree_stats_from_proto(load.cache) if load.HasField("cache") else None
    tiers = tier_stats_from_proto(load.tiers) if load.HasField("tiers") else None
    info = {
        "worker": target,
        "status": "ok",
        "role": role,
        **load_json(load.running, load.waiting, load.pages_total, load.pages_free, stats, tiers),
        "kv_transfer": transfer_json(load.transfers, load.transfer_bytes, load.transfer_seconds),
    }
    if role == "prefill":
        info["held_requests"] = load.held_requests
    if load.HasField("memory"):
        fields = load.memory.DESCRIPTOR.fields
        info["memory"] = {f.name: getattr(load.memory, f.name) for f in fields}
    return info, (stats, tiers, load)


async def _l3_store(cache: Any) -> dict[str, int] | None:
    """The cluster's L3 store as the cache service indexes it (None: unreachable)."""
    try:
        store = await cache.Stats(cache_pb2.StatsRequest(), timeout=RPC_TIMEOUT)
    except grpc.aio.AioRpcError:
        return None
    return {
        "pages": store.l3_pages,
        "bytes": store.l3_bytes,
        "budget_bytes": store.l3_budget_bytes,
        "evicted": store.l3_evicted,
    }
