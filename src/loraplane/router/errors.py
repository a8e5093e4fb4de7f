"""Refusals in the shape each API's clients parse: OpenAI's for /v1/*, TGI's for its routes.

The same shapes as the runtime's (runtime/server/errors.py), so a client cannot tell whether
the router or a pod refused; tests/router/test_errors.py holds the two side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Api(StrEnum):
    OPENAI = "openai"
    TGI = "tgi"


TGI_PATHS = ("/", "/generate", "/generate_stream")


def api_of(path: str) -> Api:
    return Api.TGI if path in TGI_PATHS else Api.OPENAI


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str
    kind: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    retry_after: int | None = None

    def body(self, api: Api) -> dict[str, Any]:
        if api is Api.TGI:
            return {"error": self.message, "error_type": self.code or self.kind}
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def model_not_found(api: Api, model: str, base: str) -> Refusal:
    """The runtime's 404 for a model it does not serve: its code differs between the APIs."""
    message = (
        f"model {model!r} is neither the base model {base!r} nor one of its LoraAdapters; "
        "GET /v1/models lists what this endpoint serves"
    )
    if api is Api.TGI:
        return Refusal(404, message, code="not_found")
    return Refusal(404, message, code="model_not_found", param="model")


def invalid(api: Api, message: str, param: str | None = None) -> Refusal:
    # The runtime answers a malformed body with 400 on OpenAI's routes, 422 on TGI's.
    return Refusal(422 if api is Api.TGI else 400, message, code="validation", param=param)


def unauthorized() -> Refusal:
    return Refusal(
        401,
        "missing or wrong API key: send 'Authorization: Bearer <key>' with a key of this "
        "deployment",
        code="invalid_api_key",
    )


def too_large(size: int, limit: int) -> Refusal:
    return Refusal(
        413,
        f"the request body is {size}+ bytes, above the router's limit of {limit} "
        "(LORAPLANE_ROUTER_MAX_BODY_BYTES)",
        code="request_too_large",
    )


def not_routed(path: str) -> Refusal:
    return Refusal(
        404,
        f"{path} is not served here: the router takes /v1/completions, /v1/chat/completions, "
        "/v1/models, /, /generate and /generate_stream",
        code="not_found",
    )
