"""Error bodies in the shape each API's clients parse: OpenAI's, TGI's, and ours for admin."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplane.api.wire import ErrorBody
from loraplane.runtime.adapters.errors import AdapterError
from loraplane.runtime.outputs import InvalidRequest, QueueFull, ShuttingDown

log = logging.getLogger(__name__)

TGI_PATHS = ("/generate", "/generate_stream")


def _documented(statuses: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody, "description": why} for code, why in statuses.items()}


# What the OpenAPI document lists for each group of routes (TGI routes answer TGI's shape).
GENERATION_ERRORS = _documented(
    {
        400: "invalid parameters, a prompt too long for this server, or invalid text",
        404: "the model is neither the base nor a loaded adapter",
        413: "the body is larger than --max-request-bytes",
        429: "the queue is full (--max-queue); retry after Retry-After seconds",
        500: "this request's generation failed (its neighbours are unaffected)",
        503: "shutting down, or the adapter failed and must be PUT again",
    }
)
ADMIN_ERRORS = _documented(
    {
        400: "bad adapter name, source or body",
        401: "missing or wrong bearer token",
        404: "adapter or source not found",
        409: "pinning leaves no slot, or a DELETE or newer PUT came during the load",
        413: "the body is larger than --max-request-bytes",
        422: "the adapter is malformed, too large or does not fit the base (error.param names the field)",
        429: "--max-concurrent-fetches fetches are running; retry later",
        502: "the source could not be reached",
        503: "the runtime is shutting down",
        504: "the fetch took more than --fetch-timeout",
        507: "no space left in the cache dir",
    }
)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = (
            status,
            message,
            kind,
            code,
            param,
        )


def is_tgi(request: Request) -> bool:
    return request.url.path in TGI_PATHS or request.url.path == "/"


def error_response(request: Request, err: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status in (429, 503) else None
    if is_tgi(request):
        body: dict = {"error": err.message, "error_type": err.code or err.kind}
    else:
        body = {
            "error": {
                "message": err.message,
                "type": err.kind,
                "param": err.param,
                "code": err.code,
            }
        }
    return JSONResponse(body, status_code=err.status, headers=headers)


def as_api_error(exc: Exception, request: Request) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), "server_overloaded", "overloaded")
    if isinstance(exc, ShuttingDown):
        return APIError(503, str(exc), "server_unavailable", "shutting_down")
    if isinstance(exc, AdapterError):
        if (
            exc.status == 404
            and request.url.path.startswith("/v1/")
            and not request.url.path.startswith("/v1/adapters")
        ):
            return APIError(404, exc.message, "invalid_request_error", "model_not_found", "model")
        return APIError(exc.status, exc.message, "invalid_request_error", exc.kind, exc.field)
    if isinstance(exc, InvalidRequest):  # only this is the client's fault; anything else is a bug
        status = 422 if is_tgi(request) else 400
        return APIError(status, str(exc), "invalid_request_error", "validation")
    raise exc


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ".".join(loc) or None
    return f"{where or 'body'}: {first.get('msg', 'invalid request')}", where


def install(app) -> None:
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        status = 422 if is_tgi(request) else 400
        return error_response(request, APIError(status, message, param=param, code="validation"))

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, as_api_error(exc, request))

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, APIError(exc.status_code, str(exc.detail), code="http"))

    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        # A bug still answers in the API's shape (clients parse it); the traceback goes to the log.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            request,
            APIError(500, "internal error; see the runtime's log", "server_error", "internal"),
        )

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_bug)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for exc_type in (APIError, QueueFull, ShuttingDown, AdapterError, InvalidRequest):
        app.add_exception_handler(exc_type, on_error)
