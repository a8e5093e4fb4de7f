"""The router refuses in the runtime's shapes: a client cannot tell who said 404, 400 or 429."""

from __future__ import annotations

import json

import pytest
from starlette.requests import Request

from loraplane.router import errors
from loraplane.router.errors import Api

PATHS = {Api.OPENAI: "/v1/completions", Api.TGI: "/generate"}


def runtime_answer(path: str, exc: Exception) -> tuple[int, dict]:
    """What the runtime itself answers for exc on path (imports the runtime, and torch)."""
    from loraplane.runtime.server.errors import as_api_error, error_response

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [],
        "query_string": b"",
        "scheme": "http",
        "server": ("pod", 8000),
    }
    request = Request(scope)
    response = error_response(request, as_api_error(exc, request))
    return response.status_code, json.loads(response.body)


def same_shape(router: dict, runtime: dict) -> None:
    """Equal but for the words of the message."""
    if isinstance(router["error"], dict):
        router = {**router, "error": {**router["error"], "message": "-"}}
        runtime = {**runtime, "error": {**runtime["error"], "message": "-"}}
    else:
        router, runtime = {**router, "error": "-"}, {**runtime, "error": "-"}
    assert router == runtime


@pytest.mark.parametrize("api", list(Api))
def test_unknown_adapter_is_the_runtimes_404(api: Api) -> None:
    from loraplane.runtime.adapters.errors import AdapterNotFound

    status, body = runtime_answer(PATHS[api], AdapterNotFound("adapter 'nope' is not loaded"))
    refusal = errors.model_not_found(api, "nope", "tiny")
    assert refusal.status == status == 404
    same_shape(refusal.body(api), body)
    assert "nope" in json.dumps(refusal.body(api)) and "/v1/models" in refusal.message


@pytest.mark.parametrize("api", list(Api))
def test_a_malformed_body_is_the_runtimes_validation_refusal(api: Api) -> None:
    from loraplane.runtime.outputs import InvalidRequest

    status, body = runtime_answer(PATHS[api], InvalidRequest("bad"))
    refusal = errors.invalid(api, "bad")
    assert refusal.status == status
    same_shape(refusal.body(api), body)


def test_the_router_queue_full_is_the_runtimes_429() -> None:
    from loraplane.runtime.engine import QueueFull

    status, body = runtime_answer(PATHS[Api.OPENAI], QueueFull("full"))
    refusal = errors.Refusal(429, "full", "server_overloaded", "overloaded", retry_after=3)
    assert refusal.status == status
    same_shape(refusal.body(Api.OPENAI), body)
    assert refusal.headers() == {"Retry-After": "3"}


def test_tgi_paths() -> None:
    assert [errors.api_of(p) for p in ("/", "/generate", "/generate_stream")] == [Api.TGI] * 3
    assert errors.api_of("/v1/chat/completions") is Api.OPENAI
