"""FastAPI app: OpenAI-compatible and SGLang-style endpoints over a Backend (the routes in
gateway/routes/, one router per API)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from gateway.access import error_body, install_access
from gateway.backend import Backend
from gateway.front import Front
from gateway.metrics import Metrics
from gateway.protocol import document_bodies
from gateway.rest import validation_message
from gateway.routes import admin, native, openai
from gateway.tool_formats import tool_format


def create_app(
    backend: Backend,
    api_key: str | None = None,
    protect_health: bool = False,
    metrics: Metrics | None = None,
    tool_call_parser: str = "json",
) -> FastAPI:
    """The REST front; metrics: shared with the gRPC front when both serve one backend;
    tool_call_parser: the chat API's tool format (gateway.tool_formats)."""
    app = FastAPI(title="strata", version="0.1.0")
    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_bodies(plain_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    metrics = metrics or Metrics()
    app.state.backend, app.state.metrics = backend, metrics
    app.state.front = Front(backend, metrics, tool_format(tool_call_parser))
    install_access(app, api_key, protect_health)
    app.exception_handler(RequestValidationError)(_invalid)
    app.exception_handler(ValueError)(_bad_value)
    for router in (openai.router, native.router, admin.router):
        app.include_router(router)
    return app


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_body(validation_message(exc.errors()))


async def _bad_value(_: Request, exc: ValueError) -> JSONResponse:
    return error_body(str(exc))
