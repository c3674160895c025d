"""SGLang's native API: /generate, /open_session, /close_session, /tokenize, /get_model_info
and /abort_request."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from gateway.front import Front
from gateway.protocol import (
    AbortRequest,
    CloseSessionRequest,
    GenerateRequest,
    OpenSessionRequest,
    TokenizeRequest,
)
from gateway.rest import BadRequest, backend_of, check_error, front_of, parse_body, stream
from strata.engine.request import Checked, RequestOutput
from strata.sampling.params import SamplingParams
from strata.tokenizer import chat_roles

router = APIRouter()


@router.post("/generate", response_model=None)
async def generate(request: Request) -> Any:
    body = await parse_body(request, GenerateRequest)
    front = front_of(request)
    prompts = _prompts(body, front)
    if body.batched and body.stream:
        raise BadRequest("a batch (a list of texts or of input_ids) cannot be streamed")
    if body.batched and body.rid is not None:
        raise BadRequest("`rid` names one request; leave it out for a batch")
    params = body.params()
    session = None
    if body.session_params is not None:
        if body.batched:
            raise BadRequest("a batch cannot continue a session: send one prompt")
        prompts[0], session = await front.in_session(body.session_params, prompts[0])
    checked = [await front.validate(ids, params, session) for ids in prompts]
    start = time.monotonic()
    if body.stream:
        rid = body.rid or uuid.uuid4().hex
        events = stream(
            front, checked[0], "generate", _stream_render(rid, start), rid=rid, openai=False
        )
        return StreamingResponse(events, media_type="text/event-stream")
    if not body.batched:
        return await _collect(front, checked[0], body.rid or uuid.uuid4().hex, params, start)
    runs = (_collect(front, c, uuid.uuid4().hex, params, start) for c in checked)
    return list(await asyncio.gather(*runs))


def _prompts(body: GenerateRequest, front: Front) -> list[list[int]]:
    if body.input_ids is not None:
        return body.id_lists()
    if body.text is None and body.prompt is None:
        raise BadRequest("give `text`, `input_ids` or `prompt`")
    texts = body.text if body.text is not None else body.prompt or ""
    return [front.encode(t) for t in (texts if isinstance(texts, list) else [texts])]


def _usage(out: RequestOutput) -> dict[str, int]:
    """/generate's usage object (the seeds' short form documents it)."""
    u = out.usage
    assert u is not None
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "cached_tokens": u.cached_tokens,
    }


def _meta(ev: RequestOutput, rid: str, start: float) -> dict[str, Any]:
    u = ev.usage
    info: dict[str, Any] = {"id": rid, "e2e_latency": time.monotonic() - start}
    if u is not None:
        info.update(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            cached_tokens=u.cached_tokens,
            cached_tokens_by_tier=u.by_tier(),
            attention_sparsity_ratio=u.attention_sparsity_ratio,
        )
    if ev.finish_reason:
        info["finish_reason"] = {"type": ev.finish_reason}
        if ev.error:
            info["finish_reason"]["message"] = ev.error
    return info


def _stream_render(rid: str, start: float) -> Any:
    """A streamed /generate: every event carries the text and ids so far."""
    text: list[str] = []
    out_ids: list[int] = []

    def render(_: int, ev: RequestOutput) -> list[Any]:
        text.append(ev.text)
        out_ids.extend(ev.token_ids)
        event = {
            "text": "".join(text),
            "output_ids": list(out_ids),
            "meta_info": _meta(ev, rid, start),
        }
        if ev.usage is not None:  # the last event
            event["usage"] = _usage(ev)
        return [event]

    return render


async def _collect(
    front: Front, request: Checked, rid: str, params: SamplingParams, start: float
) -> dict[str, Any]:
    run = await front.collect(request, "generate", rid)
    check_error(run)
    last = run.last
    info = _meta(last, rid, start)
    text = lambda t: front.tokenizer.decode([t])
    if params.logprobs:
        info["output_token_logprobs"] = [[lp, t, text(t)] for t, lp, _ in run.logprobs]
    if params.logprob_start_len >= 0:
        prompt = request.prompt_ids[params.logprob_start_len :]
        info["input_token_logprobs"] = [
            [lp, t, text(t)] for lp, t in zip(last.input_logprobs or [], prompt)
        ]
    return {"text": run.text, "output_ids": run.token_ids, "meta_info": info, "usage": _usage(last)}


@router.post("/open_session")
async def open_session(request: Request) -> str:
    """A new session's id (SGLang's shape): its requests' KV stays pinned while it lives."""
    body = await parse_body(request, OpenSessionRequest)
    return await backend_of(request).open_session(body.timeout, body.capacity_of_str_len)


@router.post("/close_session")
async def close_session(request: Request) -> dict[str, Any]:
    body = await parse_body(request, CloseSessionRequest)
    if not await backend_of(request).close_session(body.session_id):
        raise BadRequest(f"session {body.session_id!r} is not open")
    return {"status": "ok"}


@router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    body = await parse_body(request, TokenizeRequest)
    tok = front_of(request).tokenizer
    tokens = list(tok.encode(body.text, add_special_tokens=body.add_special_tokens))
    return {"tokens": tokens, "count": len(tokens)}


@router.get("/get_model_info")
async def model_info(request: Request) -> dict[str, Any]:
    backend = backend_of(request)
    roles = chat_roles(backend.tokenizer)
    return {"model_path": backend.model_name, "is_generation": True, "chat_roles": roles}


@router.post("/abort_request")
async def abort_request(request: Request) -> dict[str, Any]:
    body = await parse_body(request, AbortRequest)
    return {"rid": body.rid, "found": await backend_of(request).abort(body.rid)}
