"""The router's HTTP face: OpenAI and TGI routes, /v1/models, health; keys and body limits.

Every route but health needs an API key when the deployment has some. Nothing else of the
runtime is reachable through the router: its admin API (/v1/adapters) and /metrics are not
routes here, so a client can neither load nor unload an adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive

from .choice import requested_model, resolve
from .config import RouterConfig
from .dispatch import Answer, Call, Router
from .errors import (
    Api,
    Refusal,
    api_of,
    invalid,
    model_not_found,
    not_routed,
    too_large,
    unauthorized,
)
from .keys import Access

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/", "/generate", "/generate_stream")
UNLABELLED = ""  # the metrics' adapter label of a request that named no known model


def create_app(router: Router, access: Access, config: RouterConfig) -> Starlette:
    def refuse(api: Api, refusal: Refusal, count: bool = True) -> Response:
        if count:
            router.metrics.requests.labels(adapter=UNLABELLED, code=str(refusal.status)).inc()
        return JSONResponse(refusal.body(api), refusal.status, headers=refusal.headers())

    async def synced(api: Api) -> Response | None:
        """None once the table is read; a 503 when the API could not be read in time."""
        try:
            await asyncio.wait_for(router.synced.wait(), config.hold_timeout_seconds)
        except TimeoutError:
            message = "the router could not read its deployment from the Kubernetes API yet"
            unavailable = Refusal(503, message, "server_unavailable", "not_ready", retry_after=5)
            return refuse(api, unavailable)
        return None

    async def generate(request: Request) -> Response:
        api = api_of(request.url.path)
        if not access.allows(request.headers.get("authorization")):
            return refuse(api, unauthorized())
        body = await _read_body(request, config.max_body_bytes)
        if isinstance(body, Refusal):
            return refuse(api, body)
        try:
            parsed = json.loads(body)
        except ValueError as e:
            return refuse(api, invalid(api, f"the body is not JSON: {e}"))
        try:
            model = requested_model(api, parsed)
        except ValueError as e:
            return refuse(api, invalid(api, str(e), param="model" if api is Api.OPENAI else None))
        if (late := await synced(api)) is not None:
            return late
        target = resolve(router.table, model)
        if target is None:
            return refuse(api, model_not_found(api, str(model), config.base))
        call = Call(request.method, request.url.path, dict(request.headers), body, target)
        gone = asyncio.ensure_future(_disconnect(request.receive))
        try:
            result = await router.forward(call, gone)
        finally:
            gone.cancel()  # the response listens for the client from here
            with contextlib.suppress(asyncio.CancelledError):
                await gone
        if isinstance(result, Refusal):
            return refuse(api, result, count=False)  # forward counted it under its adapter
        return _respond(result)

    async def models(request: Request) -> Response:
        if not access.allows(request.headers.get("authorization")):
            return refuse(Api.OPENAI, unauthorized())
        if (late := await synced(Api.OPENAI)) is not None:
            return late
        table = router.table
        base = table.base
        data: list[dict[str, Any]] = [
            _model(base.name, base.created, base.root, None),
            *(_model(a.served_name, a.created, a.root, base.name) for a in table.ready_adapters()),
        ]
        return JSONResponse({"object": "list", "data": data})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if router.synced.is_set():
            return JSONResponse({"status": "ready"})
        return JSONResponse(
            {"status": "not ready", "reason": "listing the deployment's pods and adapters"}, 503
        )

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        api = api_of(request.url.path)
        if exc.status_code == 404:
            return refuse(api, not_routed(request.url.path))
        return refuse(api, Refusal(exc.status_code, str(exc.detail), code="http"))

    routes = [
        *(Route(path, generate, methods=["POST"]) for path in GENERATION_PATHS),
        Route("/v1/models", models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: on_http})


async def _read_body(request: Request, limit: int) -> bytes | Refusal:
    """The whole body, or a 413 as soon as it is known to pass `limit` (before reading it,
    when Content-Length says so)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return too_large(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return too_large(len(body), limit)
    return bytes(body)


async def _disconnect(receive: Receive) -> None:
    """Returns when the client closes the connection (its body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _respond(answer: Answer) -> Response:
    response: Response
    if answer.chunks is None:
        response = Response(answer.body, status_code=answer.status)
    else:
        response = StreamingResponse(answer.chunks, status_code=answer.status)
    own = [(k, v) for k, v in response.raw_headers if k == b"content-length"]
    response.raw_headers = own + [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in answer.headers
        if k.lower() != "content-length" or answer.chunks is not None
    ]
    return response


def _model(model_id: str, created: int, root: str, parent: str | None) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "loraplane",
        "root": root,
        "parent": parent,
    }
