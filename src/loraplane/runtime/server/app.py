"""create_app: the FastAPI application around a Runtime, with health, readiness and metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplane.runtime.facade import RuntimeAPI
from loraplane.runtime.server import admin_routes, errors, openai_routes, tgi_routes
from loraplane.runtime.server.generation import call

log = logging.getLogger(__name__)


async def finish_running(runtime: RuntimeAPI, deadline_s: float) -> None:
    """Stop taking requests, then give running ones until the deadline to finish."""
    await call(runtime.stop_taking_requests)
    end = time.monotonic() + deadline_s
    while not await call(runtime.idle) and time.monotonic() < end:
        await asyncio.sleep(0.05)
    if not await call(runtime.idle):
        log.warning("shutdown deadline passed with requests still running; aborting them")


class BodyLimit:
    """413 for a request body over --max-request-bytes, counted as it arrives.

    A declared Content-Length over the limit is refused before a byte is read; a chunked body
    is cut off as soon as it passes the limit, so memory never holds more than that.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            if declared.isdigit() and int(declared) > self.limit:
                raise self._too_large(int(declared))
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._too_large(seen)
            return message

        await self.app(scope, limited, send)

    def _too_large(self, size: int) -> StarletteHTTPException:
        # FastAPI passes an HTTPException raised while reading the body through as it is.
        return StarletteHTTPException(
            413,
            f"the request body is {size}+ bytes, above --max-request-bytes {self.limit}",
        )


def create_app(runtime: RuntimeAPI) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await call(runtime.start)
        preload = asyncio.create_task(asyncio.to_thread(runtime.preload_adapters))
        try:
            yield
        finally:
            preload.cancel()
            await finish_running(runtime, runtime.limits.shutdown_timeout_s)
            await call(runtime.stop)

    app = FastAPI(title="loraplane runtime", lifespan=lifespan)
    app.state.runtime = runtime
    app.add_middleware(BodyLimit, limit=runtime.limits.max_request_bytes)
    errors.install(app)
    app.include_router(openai_routes.router)
    app.include_router(tgi_routes.router)
    app.include_router(admin_routes.router)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        reason = await call(runtime.readiness)
        if reason is None:
            return {"status": "ready"}
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics(request: Request):
        return Response(await call(runtime.metrics_text), media_type=CONTENT_TYPE_LATEST)

    return app
