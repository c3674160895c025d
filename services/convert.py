"""Translation between protobuf messages and core values (one place for every service)."""

from __future__ import annotations

import math

from strata.engine.request import RequestOutput, Usage
from strata.grammar.constraint import Constraint
from strata.proto.v1 import cache_pb2, common_pb2
from strata.radix.tree import TreeStats
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
        max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
        top_k=p.top_k, min_p=p.min_p, repetition_penalty=p.repetition_penalty,
        frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
        seed=p.seed, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos, logprobs=p.logprobs, top_logprobs=p.top_logprobs,
        constraint=constraint, logprob_start_len=p.logprob_start_len,
    )  # fmt: skip


def chunk_from_output(ev: RequestOutput) -> common_pb2.TokenChunk:
    u = ev.usage
    usage = None
    if u is not None:
        usage = common_pb2.Usage(prompt_tokens=u.prompt_tokens,
                                 completion_tokens=u.completion_tokens,
                                 cached_tokens=u.cached_tokens)  # fmt: skip
    return common_pb2.TokenChunk(
        token_ids=ev.token_ids, text=ev.text, logprobs=ev.logprobs or [],
        finish_reason=FINISH.get(ev.finish_reason or "", common_pb2.FINISH_REASON_UNSPECIFIED),
        error=ev.error or "", usage=usage,
        input_logprobs=[math.nan if v is None else v for v in ev.input_logprobs or []],
        transfer_bytes=ev.transfer_bytes, transfer_seconds=ev.transfer_seconds,
    )  # fmt: skip


def output_from_chunk(rid: str, c: common_pb2.TokenChunk) -> RequestOutput:
    usage = None
    if c.HasField("usage"):
        usage = Usage(c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.cached_tokens)
    return RequestOutput(
        rid, list(c.token_ids), c.text, finish_reason=FINISH_NAME.get(c.finish_reason),
        error=c.error or None, usage=usage, logprobs=list(c.logprobs) or None,
        input_logprobs=[None if math.isnan(v) else v for v in c.input_logprobs] or None,
        transfer_bytes=c.transfer_bytes, transfer_seconds=c.transfer_seconds,
    )  # fmt: skip


def tree_stats_from_proto(r: cache_pb2.StatsResponse) -> TreeStats:
    return TreeStats(r.total_nodes, r.cached_pages, r.locked_pages, r.shared_prefix_count,
                     r.avg_sharing_depth, r.hit_rate, r.prompt_tokens, r.cached_tokens)  # fmt: skip
