"""FastAPI app: OpenAI-compatible and SGLang-style endpoints over a Backend."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from gateway.access import error_body, install_access, read_body
from gateway.backend import Backend
from gateway.chat_stream import ChatStream
from gateway.front import Collected, Front
from gateway.metrics import Metrics
from gateway.protocol import (
    AbortRequest,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    TokenizeRequest,
    document_bodies,
)
from strata.engine.request import Checked, RequestOutput
from strata.sampling.params import SamplingParams
from strata.tokenizer import chat_roles

M = TypeVar("M", bound=BaseModel)


class BadRequest(ValueError):
    pass


def usage_json(*outs: RequestOutput) -> dict[str, Any]:
    """OpenAI usage of one choice, or of n choices over one prompt (counted once)."""
    us = [o.usage for o in outs if o.usage is not None]
    assert us
    completion = sum(u.completion_tokens for u in us)
    return {
        "prompt_tokens": us[0].prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": us[0].prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": max(u.cached_tokens for u in us)},
        # strata's extra field
        "attention_sparsity_ratio": sum(u.attention_sparsity_ratio for u in us) / len(us),
    }


def generate_usage(out: RequestOutput) -> dict[str, int]:
    """/generate's usage object (the seeds' short form documents it)."""
    u = out.usage
    assert u is not None
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "cached_tokens": u.cached_tokens}  # fmt: skip


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


def create_app(
    backend: Backend,
    api_key: str | None = None,
    protect_health: bool = False,
    metrics: Metrics | None = None,
) -> FastAPI:
    """The REST front; metrics: shared with the gRPC front when both serve one backend."""
    app = FastAPI(title="strata", version="0.1.0")
    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_bodies(plain_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    metrics = metrics or Metrics()
    app.state.backend, app.state.metrics = backend, metrics
    front = Front(backend, metrics)
    tok = backend.tokenizer
    install_access(app, api_key, protect_health)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_body(validation_message(exc.errors()))

    @app.exception_handler(ValueError)
    async def _bad_value(_: Request, exc: ValueError) -> JSONResponse:
        return error_body(str(exc))

    def token_text(token_id: int) -> str:
        return tok.decode([token_id])

    def check_error(run: Collected) -> None:
        if run.failed:
            raise RuntimeError(run.error)

    async def collect_choices(runs: list[Checked], endpoint: str) -> list[Collected]:
        """OpenAI `n`: one generation per request, side by side; each checked for errors."""
        done = await asyncio.gather(*(front.collect(r, endpoint) for r in runs))
        for run in done:
            check_error(run)
        return list(done)

    async def stream(
        requests: Checked | list[Checked],
        endpoint: str,
        render: Callable[[int, RequestOutput], list[Any]],
        usage_head: dict[str, Any] | None = None,
        rid: str | None = None,
    ) -> AsyncIterator[str]:
        """SSE events of one generation per params (OpenAI `n`: choice i renders with index
        i, their events interleaved as they come); with usage_head, an OpenAI usage chunk
        follows the last event. Closing the stream aborts every generation."""
        runs = requests if isinstance(requests, list) else [requests]
        lasts: list[RequestOutput] = []
        async with aclosing(front.interleaved(runs, endpoint, rid)) as events:
            async for i, ev in events:
                for chunk in render(i, ev):
                    yield sse(chunk)
                if ev.finish_reason is not None:
                    lasts.append(ev)
        if usage_head is not None and lasts:
            yield sse({**usage_head, "choices": [], "usage": usage_json(*lasts)})
        yield "data: [DONE]\n\n"

    def completion_logprobs(lps: list) -> dict[str, Any]:
        return {
            "tokens": [token_text(t) for t, _, _ in lps],
            "token_logprobs": [lp for _, lp, _ in lps],
            "top_logprobs": [{token_text(k): v for k, v in top.items()} for _, _, top in lps],
        }

    def chat_logprobs(lps: list) -> dict[str, Any]:
        def entry(t: int, lp: float) -> dict[str, Any]:
            s = token_text(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}

        return {
            "content": [
                {**entry(t, lp), "top_logprobs": [entry(k, v) for k, v in top.items()]}
                for t, lp, top in lps
            ]
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": backend.model_name, "object": "model", "created": 0,
                      "owned_by": "strata"}],
        }  # fmt: skip

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        body = await parse_body(request, CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise BadRequest("only one prompt per request is supported")
            prompt = prompt[0]
        ids = front.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        params = body.params()
        request_ = await front.validate(ids, params)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created,
                "model": backend.model_name}  # fmt: skip
        echo = (prompt if isinstance(prompt, str) else tok.decode(ids)) if body.echo else ""
        if body.stream:
            echoed: set[int] = set()

            def render(i: int, ev: RequestOutput) -> list[Any]:
                out: list[Any] = []
                if echo and i not in echoed:
                    echoed.add(i)
                    first = {"index": i, "text": echo, "finish_reason": None, "logprobs": None}
                    out.append({**head, "choices": [first]})
                if ev.text or ev.finish_reason:
                    choice = {"index": i, "text": ev.text, "finish_reason": ev.finish_reason,
                              "logprobs": None}  # fmt: skip
                    out.append({**head, "choices": [choice]})
                return out

            usage = head if body.include_usage else None
            return StreamingResponse(
                stream(body.fan_out(request_), "completions", render, usage),
                media_type="text/event-stream",
            )
        runs = await collect_choices(body.fan_out(request_), "completions")
        choices = []
        for i, run in enumerate(runs):
            lp = completion_logprobs(run.logprobs) if params.logprobs else None
            choices.append({"index": i, "text": echo + run.text,
                            "finish_reason": run.last.finish_reason, "logprobs": lp})  # fmt: skip
        return {**head, "choices": choices, "usage": usage_json(*(r.last for r in runs))}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Any:
        body = await parse_body(request, ChatCompletionRequest)
        params = body.params()
        request_ = await front.validate(front.chat_prompt(body.chat()), params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": backend.model_name}
        if body.stream:
            chunk_head = {**head, "object": "chat.completion.chunk"}
            render = ChatStream(body, chunk_head).render
            usage = chunk_head if body.include_usage else None
            return StreamingResponse(
                stream(body.fan_out(request_), "chat", render, usage),
                media_type="text/event-stream",
            )
        runs = await collect_choices(body.fan_out(request_), "chat")
        choices = []
        for i, run in enumerate(runs):
            message: dict[str, Any] = {"role": "assistant", "content": run.text}
            finish_reason = run.last.finish_reason
            calls = body.tool_calls(run.text) if finish_reason == "stop" else None
            if calls is not None:
                message = {"role": "assistant", "content": None, "tool_calls": calls}
                finish_reason = "tool_calls"
            choices.append({
                "index": i, "message": message, "finish_reason": finish_reason,
                "logprobs": chat_logprobs(run.logprobs) if params.logprobs else None,
            })  # fmt: skip
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": usage_json(*(r.last for r in runs))}  # fmt: skip

    @app.post("/generate", response_model=None)
    async def generate(request: Request) -> Any:
        body = await parse_body(request, GenerateRequest)
        prompts: list[list[int]]
        if body.input_ids is not None:
            prompts = body.id_lists()
        elif body.text is not None or body.prompt is not None:
            texts = body.text if body.text is not None else body.prompt or ""
            prompts = [front.encode(t) for t in (texts if isinstance(texts, list) else [texts])]
        else:
            raise BadRequest("give `text`, `input_ids` or `prompt`")
        if body.batched and body.stream:
            raise BadRequest("a batch (a list of texts or of input_ids) cannot be streamed")
        if body.batched and body.rid is not None:
            raise BadRequest("`rid` names one request; leave it out for a batch")
        params = body.params()
        checked = [await front.validate(ids, params) for ids in prompts]

        def meta(ev: RequestOutput, rid: str, start: float) -> dict[str, Any]:
            u = ev.usage
            info: dict[str, Any] = {"id": rid, "e2e_latency": time.monotonic() - start}
            if u is not None:
                info.update(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                            cached_tokens=u.cached_tokens,
                            attention_sparsity_ratio=u.attention_sparsity_ratio)  # fmt: skip
            if ev.finish_reason:
                info["finish_reason"] = {"type": ev.finish_reason}
                if ev.error:
                    info["finish_reason"]["message"] = ev.error
            return info

        start = time.monotonic()
        if body.stream:
            rid = body.rid or uuid.uuid4().hex
            text: list[str] = []
            out_ids: list[int] = []

            def render(_: int, ev: RequestOutput) -> list[Any]:
                text.append(ev.text)
                out_ids.extend(ev.token_ids)
                event = {"text": "".join(text), "output_ids": list(out_ids),
                         "meta_info": meta(ev, rid, start)}  # fmt: skip
                if ev.usage is not None:  # the last event
                    event["usage"] = generate_usage(ev)
                return [event]

            return StreamingResponse(
                stream(checked[0], "generate", render, rid=rid), media_type="text/event-stream"
            )

        async def one(request_: Checked, rid: str) -> dict[str, Any]:
            run = await front.collect(request_, "generate", rid)
            ids = request_.prompt_ids
            check_error(run)
            last = run.last
            info = meta(last, rid, start)
            if params.logprobs:
                info["output_token_logprobs"] = [
                    [lp, t, token_text(t)] for t, lp, _ in run.logprobs
                ]
            if params.logprob_start_len >= 0:
                prompt = ids[params.logprob_start_len :]
                info["input_token_logprobs"] = [
                    [lp, t, token_text(t)] for lp, t in zip(last.input_logprobs or [], prompt)
                ]
            return {"text": run.text, "output_ids": run.token_ids, "meta_info": info,
                    "usage": generate_usage(last)}  # fmt: skip

        if not body.batched:
            return await one(checked[0], body.rid or uuid.uuid4().hex)
        return list(await asyncio.gather(*(one(c, uuid.uuid4().hex) for c in checked)))

    @app.post("/abort_request")
    async def abort_request(request: Request) -> dict[str, Any]:
        body = await parse_body(request, AbortRequest)
        return {"rid": body.rid, "found": await backend.abort(body.rid)}

    @app.get("/get_server_info")
    async def server_info() -> dict[str, Any]:
        return {"version": app.version, **await backend.server_info()}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return await backend.health()

    @app.get("/health_generate")
    async def health_generate() -> dict[str, Any]:
        ping = await front.validate(front.encode("ping"), SamplingParams(max_new_tokens=1))
        run = await front.collect(ping, "health")
        return {"status": "error" if run.failed else "ok"}

    @app.get("/metrics")
    async def metrics_endpoint() -> PlainTextResponse:
        metrics.observe_health(await backend.health())
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/flush_cache")
    async def flush_cache() -> dict[str, Any]:
        return {"status": "ok", "flushed_pages": await backend.flush_cache()}

    @app.get("/get_model_info")
    async def model_info() -> dict[str, Any]:
        return {"model_path": backend.model_name, "is_generation": True,
                "chat_roles": chat_roles(tok)}  # fmt: skip

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await parse_body(request, TokenizeRequest)
        tokens = list(tok.encode(body.text, add_special_tokens=body.add_special_tokens))
        return {"tokens": tokens, "count": len(tokens)}

    return app
