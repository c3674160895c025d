"""Translation between protobuf messages and core values (one place for every service)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

from strata.cache.keys import KEY_BYTES
from strata.cache.mirror import Batch
from strata.cache.results import KVEvent, TreeStats
from strata.engine.request import RequestOutput, Usage
from strata.grammar.constraint import Constraint
from strata.proto.v1 import cache_pb2, common_pb2, worker_pb2
from strata.sampling.params import SamplingParams

FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "error": common_pb2.FINISH_REASON_ERROR,
}
FINISH_NAME = {v: k for k, v in FINISH.items()}
DEFAULTS = SamplingParams()


def params_from_proto(m: common_pb2.SamplingParams) -> SamplingParams:
    """Core params (validated by SamplingParams: ValueError names a bad field)."""

    def opt(name: str):  # unset optional fields take the core default
        return getattr(m, name) if m.HasField(name) else getattr(DEFAULTS, name)

    kind = m.constraint.WhichOneof("kind")
    constraint = None
    if kind == "json_object":
        constraint = Constraint("json_object")
    elif kind is not None:
        constraint = Constraint(kind, getattr(m.constraint, kind))
    return SamplingParams(
        max_new_tokens=m.max_new_tokens or DEFAULTS.max_new_tokens,
        temperature=opt("temperature"),
        top_p=opt("top_p"),
        top_k=opt("top_k"),
        min_p=opt("min_p"),
        repetition_penalty=opt("repetition_penalty"),
        frequency_penalty=opt("frequency_penalty"),
        presence_penalty=opt("presence_penalty"),
        seed=m.seed if m.HasField("seed") else None,
        stop=tuple(m.stop),
        stop_token_ids=tuple(m.stop_token_ids),
        ignore_eos=m.ignore_eos,
        logprobs=m.logprobs,
        top_logprobs=m.top_logprobs,
        constraint=constraint,
        logprob_start_len=opt("logprob_start_len"),
        logit_bias=tuple(sorted(m.logit_bias.items())),
        priority=m.priority,
        priority_ttl=opt("priority_ttl_s")
        if m.HasField("priority_ttl_s")
        else DEFAULTS.priority_ttl,
    )


def params_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    c = p.constraint
    constraint = None
    if c is not None:
        constraint = common_pb2.Constraint()
        if c.kind == "json_object":
            constraint.json_object = True
        else:
            setattr(constraint, c.kind, c.source)
    return common_pb2.SamplingParams(
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        seed=p.seed,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs,
        top_logprobs=p.top_logprobs,
        constraint=constraint,
        logprob_start_len=p.logprob_start_len,
        logit_bias=dict(p.logit_bias),
        priority=p.priority,
        priority_ttl_s=p.priority_ttl,
    )


def chunk_from_output(ev: RequestOutput) -> common_pb2.TokenChunk:
    u = ev.usage
    usage = None
    if u is not None:
        usage = common_pb2.Usage(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            cached_tokens=u.cached_tokens,
            attention_sparsity_ratio=u.attention_sparsity_ratio,
            queue_seconds=u.queue_seconds,
            l2_tokens=u.l2_tokens,
            l3_tokens=u.l3_tokens,
        )
    return common_pb2.TokenChunk(
        token_ids=ev.token_ids,
        text=ev.text,
        logprobs=ev.logprobs or [],
        finish_reason=FINISH.get(ev.finish_reason or "", common_pb2.FINISH_REASON_UNSPECIFIED),
        error=ev.error or "",
        usage=usage,
        input_logprobs=[math.nan if v is None else v for v in ev.input_logprobs or []],
        transfer_bytes=ev.transfer_bytes,
        transfer_seconds=ev.transfer_seconds,
    )


def output_from_chunk(rid: str, c: common_pb2.TokenChunk) -> RequestOutput:
    usage = None
    if c.HasField("usage"):
        u = c.usage
        usage = Usage(
            u.prompt_tokens,
            u.completion_tokens,
            u.cached_tokens,
            u.attention_sparsity_ratio,
            u.queue_seconds,
            u.l2_tokens,
            u.l3_tokens,
        )
    return RequestOutput(
        rid,
        list(c.token_ids),
        c.text,
        finish_reason=FINISH_NAME.get(c.finish_reason),
        error=c.error or None,
        usage=usage,
        logprobs=list(c.logprobs) or None,
        input_logprobs=[None if math.isnan(v) else v for v in c.input_logprobs] or None,
        transfer_bytes=c.transfer_bytes,
        transfer_seconds=c.transfer_seconds,
    )


def tree_stats_to_proto(t: TreeStats) -> worker_pb2.CacheStats:
    return worker_pb2.CacheStats(**asdict(t))


def tree_stats_from_proto(r: worker_pb2.CacheStats) -> TreeStats:
    return TreeStats(**{f.name: getattr(r, f.name) for f in fields(TreeStats)})


def tier_stats_to_proto(t: dict[str, Any]) -> worker_pb2.TierStats:
    return worker_pb2.TierStats(
        l2_pages=t["l2"]["pages"],
        l2_used_pages=t["l2"]["used_pages"],
        l2_bytes=t["l2"]["bytes"],
        l3=t["l3"] is not None,
        l3_bad_files=(t["l3"] or {}).get("bad_files", 0),
        l3_skipped_writes=(t["l3"] or {}).get("skipped_writes", 0),
        bytes_moved=t["bytes_moved"],
        write_policy=t["write_policy"],
        page_bytes=t["page_bytes"],
    )


def tier_stats_from_proto(r: worker_pb2.TierStats) -> dict[str, Any]:
    l3 = {"bad_files": r.l3_bad_files, "skipped_writes": r.l3_skipped_writes} if r.l3 else None
    return {
        "l2": {"pages": r.l2_pages, "used_pages": r.l2_used_pages, "bytes": r.l2_bytes},
        "l3": l3,
        "bytes_moved": dict(r.bytes_moved),
        "write_policy": r.write_policy,
        "page_bytes": r.page_bytes,
    }


COSTS = ("compute_token", "l2_page", "l3_page")


def costs_to_proto(costs: Mapping[str, float | None]) -> cache_pb2.LoadCosts:
    return cache_pb2.LoadCosts(**{k: costs.get(k) or 0.0 for k in COSTS})


def costs_from_proto(c: cache_pb2.LoadCosts) -> dict[str, float]:
    """Only the measured ones (0 on the wire means not measured yet)."""
    return {k: getattr(c, k) for k in COSTS if getattr(c, k) > 0}


def batch_to_proto(b: Batch) -> cache_pb2.EventBatch:
    return cache_pb2.EventBatch(
        worker=b.worker,
        seed=b.seed,
        page_size=b.page_size,
        first_seq=b.first_seq,
        snapshot=b.snapshot,
        costs=costs_to_proto(b.costs),
        page_file_bytes=b.page_file_bytes,
        events=[
            cache_pb2.KVEvent(
                kind=e.kind, tier=e.tier, keys=e.keys, priority=e.priority, ttl_s=e.ttl
            )
            for e in b.events
        ],
    )


EVENT_KINDS, EVENT_TIERS = ("stored", "removed", "hit", "held"), ("l1", "l2", "l3")
MAX_PAGE_SIZE = 1 << 16


def batch_from_proto(m: cache_pb2.EventBatch) -> Batch:
    """The batch, checked (ValueError: a message no worker sends, which must not reach the
    index: a page size of 0 once made every later route fail)."""
    if not m.worker:
        raise ValueError("an event batch names its worker")
    if not 1 <= m.page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size {m.page_size} is not in [1, {MAX_PAGE_SIZE}]")
    for e in m.events:
        if e.kind not in EVENT_KINDS or e.tier not in EVENT_TIERS:
            raise ValueError(f"unknown KV event {e.kind!r} in tier {e.tier!r}")
        if any(len(k) != KEY_BYTES for k in e.keys):
            raise ValueError(f"a page key is {KEY_BYTES} bytes")
        if e.kind == "held" and not (e.tier == "l3" and e.priority <= 100 and 0 < e.ttl_s <= 86400):
            raise ValueError("a held event is l3, with priority <= 100 and ttl_s in (0, 86400]")
    return Batch(
        m.worker,
        m.seed,
        m.page_size,
        m.first_seq,
        m.snapshot,
        [KVEvent(e.kind, e.tier, list(e.keys), e.priority, e.ttl_s) for e in m.events],
        costs_from_proto(m.costs),
        m.page_file_bytes,
    )
