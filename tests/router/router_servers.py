"""Real HTTP servers on loopback for router tests: fake runtime pods and the router itself.

A fake pod answers the runtime's routes with which pod and model served the request, and can
misbehave the ways a real pod does: refuse connections, drop them, drain, stream slowly, die
mid-answer. Everything runs in the test's event loop, on 127.0.0.1 ports the OS picks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from router_objects import BASE, base_model, pod
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loraplane.router.app import create_app
from loraplane.router.config import RouterConfig
from loraplane.router.dispatch import Router
from loraplane.router.keys import Access
from loraplane.router.metrics import RouterMetrics
from loraplane.router.upstream import Upstream

LOOPBACK = "127.0.0.1"


async def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `check` on the loop until it is truthy; fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def bound_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    return sock


def closed_port() -> int:
    """A port nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[int]:
    """Serve an ASGI app with uvicorn on a loopback port for the block; yields the port."""
    sock = bound_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started or task.done(), 10, "uvicorn to start")
        if task.done():
            task.result()
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


@contextlib.asynccontextmanager
async def dropping() -> AsyncIterator[int]:
    """A server that reads a request and closes the connection without answering."""
    received = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await reader.read(1)
        received += 1
        writer.close()

    server = await asyncio.start_server(handle, LOOPBACK, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class FakePod:
    """What one fake runtime pod does with requests; fields may change while it serves."""

    name: str
    mode: str = "ok"  # ok | drain | overloaded | cut | slow
    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    peers: list[int] = field(default_factory=list)  # the router's source port of each request
    proceed: asyncio.Event = field(default_factory=asyncio.Event)  # releases a "slow" stream

    def app(self) -> Starlette:
        async def generation(request: Request) -> Response:
            body = json.loads(await request.body())
            self.received.append(body)
            self.headers.append(dict(request.headers))
            self.peers.append(request.client.port if request.client else 0)
            model = body.get("model") or (body.get("parameters") or {}).get("adapter_id")
            answer = {"pod": self.name, "model": model, "path": request.url.path}
            if self.mode == "drain":
                return JSONResponse(_openai_error("shutting down", "shutting_down"), 503)
            if self.mode == "overloaded":
                return JSONResponse(_openai_error("queue full", "overloaded"), 429)
            if self.mode in ("cut", "slow") or body.get("stream"):
                return StreamingResponse(self._stream(answer), media_type="text/event-stream")
            return JSONResponse(answer)

        routes = [
            Route(p, generation, methods=["POST"])
            for p in (
                "/v1/completions",
                "/v1/chat/completions",
                "/",
                "/generate",
                "/generate_stream",
            )
        ]
        return Starlette(routes=routes)

    async def _stream(self, answer: dict[str, Any]) -> AsyncIterator[str]:
        yield f"data: {json.dumps({**answer, 'part': 1})}\n\n"
        if self.mode == "cut":
            raise RuntimeError("the pod died mid-answer")
        if self.mode == "slow":
            await self.proceed.wait()
        yield f"data: {json.dumps({**answer, 'part': 2})}\n\n"
        yield "data: [DONE]\n\n"


def _openai_error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "x", "param": None, "code": code}}


def router_config(**overrides: Any) -> RouterConfig:
    values: dict[str, Any] = {
        "namespace": "ns",
        "base": BASE,
        "pod_selector": "x=y",
        "host": LOOPBACK,
        "hold_timeout_seconds": 30.0,
        **overrides,
    }
    return RouterConfig(**values)


@dataclass
class RouterUnderTest:
    router: Router
    access: Access
    url: str

    def add_pod(self, name: str, port: int, ready: bool = True) -> None:
        self.router.table.put_pod(pod(name, LOOPBACK, port=port, ready=ready))
        self.router.changed()

    def remove_pod(self, name: str) -> None:
        self.router.table.drop_pod(name)
        self.router.changed()

    def put_adapter(self, body: dict[str, Any]) -> None:
        self.router.table.put_adapter(body)
        self.router.changed()

    def metric(self, name: str, **labels: str) -> float:
        value = self.router.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def running_router(**overrides: Any) -> AsyncIterator[RouterUnderTest]:
    """The router's real app, its table fed by the test instead of a watch."""
    config = router_config(**overrides)
    upstream = Upstream(config)
    router = Router(config, upstream, RouterMetrics())
    access = Access(config.api_keys_secret)
    router.table.set_base(base_model())
    router.synced.set()
    try:
        async with serving(create_app(router, access, config)) as port:
            yield RouterUnderTest(router, access, f"http://{LOOPBACK}:{port}")
    finally:
        await upstream.close()
