"""Admin routes the operator drives: list, load (idempotent PUT) and unload adapters."""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from loraplane.runtime.adapters.errors import AdapterNotFound
from loraplane.runtime.adapters.manager import AdapterEntry, Loading
from loraplane.runtime.runtime import Runtime
from loraplane.runtime.server.errors import APIError


def require_admin(request: Request) -> None:
    token = request.app.state.runtime.config.admin_token
    if token is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), token.encode()):
        raise APIError(
            401,
            "admin routes need 'Authorization: Bearer <token>'",
            "authentication_error",
            "unauthorized",
        )


router = APIRouter(prefix="/v1/adapters", dependencies=[Depends(require_admin)])


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, max_length=2048)
    revision: str | None = Field(default=None, max_length=256)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    pinned: bool = False
    # A LoraAdapter secretRef's data (HF_TOKEN, AWS_*, BEARER_TOKEN); used once, never echoed.
    credentials: dict[str, str] | None = Field(default=None, repr=False)


@router.get("")
async def list_adapters(request: Request):
    runtime: Runtime = request.app.state.runtime
    adapters = [describe(e) for e in runtime.adapters.registered()]
    loaded = {a["name"] for a in adapters}
    for name, inflight in sorted(runtime.adapters.loading_now().items()):
        if name not in loaded:  # a replacement in flight: the served entry is what counts
            adapters.append(describe_loading(name, inflight))
    return {"adapters": adapters}


@router.get("/{name}")
async def get_adapter(name: str, request: Request):
    runtime: Runtime = request.app.state.runtime
    try:
        return describe(runtime.adapters.get(name))
    except AdapterNotFound:
        inflight = runtime.adapters.loading_now().get(name)
        if inflight is None:
            raise
        return describe_loading(name, inflight)  # as the list shows it


@router.put("/{name}")
async def load_adapter(name: str, body: LoadRequest, request: Request, response: Response):
    runtime: Runtime = request.app.state.runtime
    entry, created = await asyncio.to_thread(
        runtime.load_adapter,
        name,
        body.source,
        revision=body.revision,
        sha256=body.sha256,
        pinned=body.pinned,
        credentials=body.credentials,
    )
    response.status_code = 201 if created else 200
    return describe(entry)


@router.delete("/{name}")
async def unload_adapter(name: str, request: Request):
    runtime: Runtime = request.app.state.runtime
    entry = runtime.adapters.unregister(name)
    return {"name": name, "state": "unloading" if entry is not None and entry.refs else "unloaded"}


def describe_loading(name: str, inflight: Loading) -> dict[str, Any]:
    """A load still fetching or validating: no weights yet, so nothing to report but that."""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(inflight.started_at))
    return {
        "name": name,
        "source": inflight.source,
        "revision": inflight.revision,
        "sha256": None,
        "pinned": False,
        "state": "loading",
        "tier": None,
        "rank": None,
        "target_modules": None,
        "size_bytes": None,
        "loaded_at": None,
        "loading_since": started,
        "error": None,
    }


def describe(entry: AdapterEntry) -> dict[str, Any]:
    """An adapter as the operator reads it: this is what it trusts as residency."""
    return {
        "name": entry.name,
        "source": entry.source,
        "revision": entry.revision,
        "sha256": entry.sha256,
        "pinned": entry.pinned,
        "state": entry.state,
        "tier": entry.tier,
        "rank": entry.rank,
        "target_modules": entry.target_modules,
        "size_bytes": entry.size_bytes,
        "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.loaded_at)),
        "error": entry.error,
    }
