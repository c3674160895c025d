"""What the REST routes share: request bodies parsed and checked, SSE streams of one or more
generations, and the usage objects of the replies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from gateway.access import read_body
from gateway.backend import Backend
from gateway.front import Collected, Front
from strata.engine.request import Checked, RequestOutput

M = TypeVar("M", bound=BaseModel)


class BadRequest(ValueError):
    pass


def front_of(request: Request) -> Front:
    return request.app.state.front


def backend_of(request: Request) -> Backend:
    return request.app.state.backend


def usage_json(*outs: RequestOutput) -> dict[str, Any]:
    """OpenAI usage of one choice, or of n choices over one prompt (counted once)."""
    us = [o.usage for o in outs if o.usage is not None]
    assert us
    completion = sum(u.completion_tokens for u in us)
    warmest = max(us, key=lambda u: u.cached_tokens)  # n choices: the prompt counted once
    return {
        "prompt_tokens": us[0].prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": us[0].prompt_tokens + completion,
        "prompt_tokens_details": {
            "cached_tokens": warmest.cached_tokens,
            # strata's extra field: where each prompt token came from (l1, l2, l3, computed)
            "by_tier": warmest.by_tier(),
        },
        # strata's extra field
        "attention_sparsity_ratio": sum(u.attention_sparsity_ratio for u in us) / len(us),
    }


def validation_message(errors: Sequence[Any]) -> str:
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e["loc"] if x != "body")
        parts.append(f"{where}: {e['msg']}" if where else e["msg"])
    return "; ".join(parts) or "invalid request"


async def parse_body(request: Request, model: type[M]) -> M:
    """Validate a JSON body whatever its Content-Type (plain `curl -d` works)."""
    try:
        data = json.loads(await read_body(request) or b"{}")
        # NOTE: JSON may escape half a UTF-16 pair ("\ud800"); no text of it can be encoded
        json.dumps(data, ensure_ascii=False).encode()
    except json.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    except UnicodeEncodeError:
        raise BadRequest("request body has a string with an unpaired UTF-16 surrogate") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(validation_message(exc.errors())) from exc


def sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


def check_error(run: Collected) -> None:
    if run.failed:
        raise RuntimeError(run.error)


async def collect_choices(front: Front, runs: list[Checked], endpoint: str) -> list[Collected]:
    """OpenAI `n`: one generation per request, side by side; each checked for errors."""
    done = await asyncio.gather(*(front.collect(r, endpoint) for r in runs))
    for run in done:
        check_error(run)
    return list(done)


async def stream(
    front: Front,
    requests: Checked | list[Checked],
    endpoint: str,
    render: Callable[[int, RequestOutput], list[Any]],
    usage_head: dict[str, Any] | None = None,
    rid: str | None = None,
    openai: bool = True,
) -> AsyncIterator[str]:
    """SSE events of one generation per params (OpenAI `n`: choice i renders with index i,
    their events interleaved as they come); with usage_head, an OpenAI usage chunk follows
    the last event. Closing the stream aborts every generation.

    A generation that fails ends the stream (and the others): on OpenAI's routes with an
    OpenAI error event, `{"error": {...}}`, on which its SDK raises APIError (a chunk with
    an unknown finish_reason would hand the user a truncated answer); elsewhere as render
    shows it. Then [DONE], for clients that wait for it."""
    runs = requests if isinstance(requests, list) else [requests]
    lasts: list[RequestOutput] = []
    async with aclosing(front.interleaved(runs, endpoint, rid)) as events:
        async for i, ev in events:
            if openai and ev.finish_reason == "error":
                yield sse(stream_error(ev.error or "generation failed"))
                yield "data: [DONE]\n\n"
                return
            for chunk in render(i, ev):
                yield sse(chunk)
            if ev.finish_reason is not None:
                lasts.append(ev)
    if usage_head is not None and any(last.usage is not None for last in lasts):
        yield sse({**usage_head, "choices": [], "usage": usage_json(*lasts)})
    yield "data: [DONE]\n\n"


def stream_error(message: str) -> dict[str, Any]:
    """An error inside a stream that has begun (its status, 200, was sent): OpenAI's shape."""
    return {"error": {"message": message, "type": "server_error", "param": None, "code": 500}}
