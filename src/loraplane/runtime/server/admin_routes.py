"""Admin routes the operator drives: list, load (idempotent PUT) and unload adapters."""

from __future__ import annotations

import asyncio
import hmac
from datetime import UTC, datetime

from fastapi import APIRouter, Depends, Request, Response

from loraplane.api.wire import (
    AdapterInfo,
    AdapterList,
    AdapterLoadRequest,
    AdapterUnloaded,
    RuntimeAdapterState,
    Tier,
    redact_source,
)
from loraplane.runtime.adapters.errors import AdapterNotFound
from loraplane.runtime.adapters.manager import AdapterEntry, Loading
from loraplane.runtime.runtime import Runtime
from loraplane.runtime.server.errors import ADMIN_ERRORS, APIError


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


router = APIRouter(
    prefix="/v1/adapters", dependencies=[Depends(require_admin)], responses=ADMIN_ERRORS
)


@router.get("", response_model=AdapterList)
async def list_adapters(request: Request) -> AdapterList:
    runtime: Runtime = request.app.state.runtime
    adapters = [describe(e) for e in runtime.adapters.registered()]
    adapters += [describe(e) for e in runtime.adapters.unloading()]  # deleted, still finishing
    loaded = {a.name for a in adapters}
    for name, inflight in sorted(runtime.adapters.loading_now().items()):
        if name not in loaded:  # a replacement in flight: the served entry is what counts
            adapters.append(describe_loading(name, inflight))
    return AdapterList(adapters=adapters)


@router.get("/{name}", response_model=AdapterInfo)
async def get_adapter(name: str, request: Request) -> AdapterInfo:
    runtime: Runtime = request.app.state.runtime
    try:
        return describe(runtime.adapters.get(name))
    except AdapterNotFound:
        inflight = runtime.adapters.loading_now().get(name)
        if inflight is not None:
            return describe_loading(name, inflight)  # as the list shows it
        for entry in runtime.adapters.unloading():
            if entry.name == name:
                return describe(entry)
        raise


@router.put("/{name}", response_model=AdapterInfo)
async def load_adapter(
    name: str, body: AdapterLoadRequest, request: Request, response: Response
) -> AdapterInfo:
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


@router.delete("/{name}", response_model=AdapterUnloaded)
async def unload_adapter(name: str, request: Request) -> AdapterUnloaded:
    runtime: Runtime = request.app.state.runtime
    entry = runtime.adapters.unregister(name)
    state = "unloading" if entry is not None and entry.refs else "unloaded"
    return AdapterUnloaded(name=name, state=state)


def describe_loading(name: str, inflight: Loading) -> AdapterInfo:
    """A load still fetching or validating: no weights yet, so nothing to report but that."""
    return AdapterInfo(
        name=name,
        source=redact_source(inflight.source),
        revision=inflight.revision,
        state=RuntimeAdapterState.LOADING,
        loading_since=_utc(inflight.started_at),
    )


def describe(entry: AdapterEntry) -> AdapterInfo:
    """An adapter as the operator reads it: this is what it trusts as residency."""
    return AdapterInfo(
        name=entry.name,
        source=redact_source(entry.source),
        revision=entry.revision,
        sha256=entry.sha256,
        pinned=entry.pinned,
        state=RuntimeAdapterState(entry.state),
        tier=Tier(entry.tier),
        rank=entry.rank,
        target_modules=entry.target_modules,
        size_bytes=entry.size_bytes,
        loaded_at=_utc(entry.loaded_at),
        error=entry.error,
    )


def _utc(timestamp: float) -> datetime:
    # Whole seconds, as metav1.Time: the operator copies it into status.
    return datetime.fromtimestamp(int(timestamp), UTC)
