"""The runtime's HTTP contract for one simulated pod, on aiohttp: the same paths, bodies,
status codes and error shapes as loraplane.runtime.server, from the same wire models."""

from __future__ import annotations

import hmac
import json
import time
import uuid
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from loraplane.api.wire import (
    ADAPTERS_PATH,
    HEALTH_PATH,
    METRICS_PATH,
    READY_PATH,
    AdapterList,
    AdapterLoadRequest,
    ErrorBody,
    ErrorDetail,
)

from .runtime import SimError, SimRuntime

SIM = web.AppKey("sim", SimRuntime)
TOKEN = web.AppKey("token", str)  # empty: the pod has no admin token, the routes are open
POD_HEADER = "X-Loraplane-Pod"  # which pod answered: lets router tests see where a request went


def error(status: int, message: str, kind: str, code: str | None, param: str | None = None):
    body = ErrorBody(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return web.json_response(body.model_dump(), status=status)


def _refusal(e: SimError) -> web.Response:
    return error(e.status, e.message, "invalid_request_error", e.code)


def _json(model) -> web.Response:
    return web.Response(text=model.model_dump_json(), content_type="application/json")


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except SimError as e:
        response = _refusal(e)
    except web.HTTPException as e:  # unknown path or method: the runtime's shape, code "http"
        response = error(e.status, e.reason, "invalid_request_error", "http")
    response.headers[POD_HEADER] = request.app[SIM].pod.name
    return response


@web.middleware
async def _admin_auth(request: web.Request, handler) -> web.StreamResponse:
    token = request.app[TOKEN]
    if token and request.path.startswith(ADAPTERS_PATH):
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), token.encode()):
            return error(
                401,
                "admin routes need 'Authorization: Bearer <token>'",
                "authentication_error",
                "unauthorized",
            )
    return await handler(request)


async def _body(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SimError("validation", "body: not valid JSON", status=400) from None


async def list_adapters(request: web.Request) -> web.Response:
    return _json(AdapterList(adapters=request.app[SIM].list()))


async def get_adapter(request: web.Request) -> web.Response:
    return _json(request.app[SIM].get(request.match_info["name"]))


async def put_adapter(request: web.Request) -> web.Response:
    try:
        body = AdapterLoadRequest.model_validate(await _body(request))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        return error(
            400, f"{where or 'body'}: {first['msg']}", "invalid_request_error", "validation", where
        )
    info, created = await request.app[SIM].load(request.match_info["name"], body)
    response = _json(info)
    response.set_status(201 if created else 200)
    return response


async def delete_adapter(request: web.Request) -> web.Response:
    return _json(request.app[SIM].unload(request.match_info["name"]))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SIM].metrics()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": request.app[SIM].models()})


async def completions(request: web.Request) -> web.Response:
    """Not a model: the answer says which pod and adapter served it, for router tests."""
    sim = request.app[SIM]
    body = await _body(request)
    if not isinstance(body, dict) or not isinstance(body.get("model", ""), str):
        return error(400, "model: must be a string", "invalid_request_error", "validation", "model")
    model = body.get("model")
    adapter = sim.resolve(model)
    await sim.complete(adapter)
    served = adapter or sim.pod.base_name
    text = f"served by pod {sim.pod.namespace}/{sim.pod.name} with {served}"
    return web.json_response(
        {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )


def create_app(sim: SimRuntime, token: str | None) -> web.Application:
    app = web.Application(middlewares=[_errors, _admin_auth])
    app[SIM] = sim
    app[TOKEN] = token or ""
    app.router.add_get(HEALTH_PATH, healthz)
    app.router.add_get(READY_PATH, readyz)
    app.router.add_get(METRICS_PATH, metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get(ADAPTERS_PATH, list_adapters)
    app.router.add_get(ADAPTERS_PATH + "/{name}", get_adapter)
    app.router.add_put(ADAPTERS_PATH + "/{name}", put_adapter)
    app.router.add_delete(ADAPTERS_PATH + "/{name}", delete_adapter)
    return app
