"""OpenAI's API: /v1/models, /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from gateway.chat_stream import ChatStream
from gateway.front import Collected
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.rest import (
    BadRequest,
    backend_of,
    collect_choices,
    front_of,
    parse_body,
    stream,
    usage_json,
)
from gateway.tool_formats import ToolFormat
from strata.engine.request import RequestOutput

router = APIRouter()
Logprobs = list[tuple[int, float, dict[int, float]]]


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    model = {"id": backend_of(request).model_name, "object": "model", "created": 0}
    return {"object": "list", "data": [{**model, "owned_by": "strata"}]}


@router.post("/v1/completions", response_model=None)
async def completions(request: Request) -> Any:
    body = await parse_body(request, CompletionRequest)
    front = front_of(request)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise BadRequest("only one prompt per request is supported")
        prompt = prompt[0]
    ids = front.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    params = body.params()
    ids, session = await front.in_session(body.session_params, ids, whole=True)
    runs = body.fan_out(await front.validate(ids, params, session))
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": backend_of(request).model_name,
    }
    echo = (prompt if isinstance(prompt, str) else front.tokenizer.decode(ids)) if body.echo else ""
    if body.stream:
        usage = head if body.include_usage else None
        events = stream(front, runs, "completions", _completion_chunks(head, echo), usage)
        return StreamingResponse(events, media_type="text/event-stream")
    done = await collect_choices(front, runs, "completions")
    choices = []
    for i, run in enumerate(done):
        lp = _completion_logprobs(front.tokenizer, run.logprobs) if params.logprobs else None
        last = run.last
        choices.append(
            {
                "index": i,
                "text": echo + run.text,
                "finish_reason": last.finish_reason,
                "logprobs": lp,
            }
        )
    return {**head, "choices": choices, "usage": usage_json(*(r.last for r in done))}


def _completion_chunks(head: dict[str, Any], echo: str) -> Any:
    """The render of a streamed completion: choice i's echoed prompt first, then its text."""
    echoed: set[int] = set()

    def render(i: int, ev: RequestOutput) -> list[Any]:
        out: list[Any] = []
        if echo and i not in echoed:
            echoed.add(i)
            first = {"index": i, "text": echo, "finish_reason": None, "logprobs": None}
            out.append({**head, "choices": [first]})
        if ev.text or ev.finish_reason:
            choice = {"index": i, "text": ev.text, "finish_reason": ev.finish_reason}
            out.append({**head, "choices": [{**choice, "logprobs": None}]})
        return out

    return render


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> Any:
    body = await parse_body(request, ChatCompletionRequest)
    front = front_of(request)
    params = body.params()
    prompt = front.chat_prompt(body.chat(front.tools), body.template_tools(front.tools))
    ids, session = await front.in_session(body.session_params, prompt, True)
    runs = body.fan_out(await front.validate(ids, params, session))
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": backend_of(request).model_name,
    }
    if body.stream:
        chunk_head = {**head, "object": "chat.completion.chunk"}
        usage = chunk_head if body.include_usage else None
        render = ChatStream(body, chunk_head, front.tools).render
        events = stream(front, runs, "chat", render, usage)
        return StreamingResponse(events, media_type="text/event-stream")
    done = await collect_choices(front, runs, "chat")
    choices = [
        _chat_choice(i, run, body, front.tools, front.tokenizer if params.logprobs else None)
        for i, run in enumerate(done)
    ]
    usage = usage_json(*(r.last for r in done))
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage}


def _chat_choice(
    i: int, run: Collected, body: ChatCompletionRequest, fmt: ToolFormat, tok: Any
) -> dict:
    """One choice of a chat completion; a reply that calls tools (in fmt) becomes
    tool_calls; tok: with the choice's logprobs."""
    message: dict[str, Any] = {"role": "assistant", "content": run.text}
    finish_reason = run.last.finish_reason
    found = body.tool_calls(run.text, fmt) if finish_reason == "stop" else None
    if found is not None:
        content, calls = found
        message = {"role": "assistant", "content": content, "tool_calls": calls}
        finish_reason = "tool_calls"
    return {
        "index": i,
        "message": message,
        "finish_reason": finish_reason,
        "logprobs": _chat_logprobs(tok, run.logprobs) if tok is not None else None,
    }


def _completion_logprobs(tok: Any, lps: Logprobs) -> dict[str, Any]:
    text = lambda t: tok.decode([t])
    return {
        "tokens": [text(t) for t, _, _ in lps],
        "token_logprobs": [lp for _, lp, _ in lps],
        "top_logprobs": [{text(k): v for k, v in top.items()} for _, _, top in lps],
    }


def _chat_logprobs(tok: Any, lps: Logprobs) -> dict[str, Any]:
    def entry(t: int, lp: float) -> dict[str, Any]:
        s = tok.decode([t])
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {
        "content": [
            {**entry(t, lp), "top_logprobs": [entry(k, v) for k, v in top.items()]}
            for t, lp, top in lps
        ]
    }
