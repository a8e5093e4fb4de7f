"""Error bodies in the shape each API's clients parse: OpenAI's, TGI's, and ours for admin."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplane.runtime.adapters.errors import AdapterError
from loraplane.runtime.engine import QueueFull, ShuttingDown

log = logging.getLogger(__name__)

TGI_PATHS = ("/generate", "/generate_stream")


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
    if isinstance(exc, ValueError):
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
    for exc_type in (APIError, QueueFull, ShuttingDown, AdapterError, ValueError):
        app.add_exception_handler(exc_type, on_error)
