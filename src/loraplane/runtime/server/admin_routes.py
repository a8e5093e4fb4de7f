"""Admin routes the operator drives: list, load (idempotent PUT) and unload adapters."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Request, Response

from loraplane.api.wire import AdapterInfo, AdapterList, AdapterLoadRequest, AdapterUnloaded
from loraplane.runtime.facade import RuntimeAPI
from loraplane.runtime.server.errors import ADMIN_ERRORS, APIError
from loraplane.runtime.server.generation import call


def require_admin(request: Request) -> None:
    token = _runtime(request).admin_token
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


def _runtime(request: Request) -> RuntimeAPI:
    return request.app.state.runtime


@router.get("", response_model=AdapterList)
async def list_adapters(request: Request) -> AdapterList:
    return await call(_runtime(request).list_adapters)


@router.get("/{name}", response_model=AdapterInfo)
async def get_adapter(name: str, request: Request) -> AdapterInfo:
    return await call(_runtime(request).get_adapter, name)


@router.put("/{name}", response_model=AdapterInfo)
async def load_adapter(
    name: str, body: AdapterLoadRequest, request: Request, response: Response
) -> AdapterInfo:
    info, created = await call(_runtime(request).load_adapter, name, body)
    response.status_code = 201 if created else 200
    return info


@router.delete("/{name}", response_model=AdapterUnloaded)
async def unload_adapter(name: str, request: Request) -> AdapterUnloaded:
    return await call(_runtime(request).unload_adapter, name)
