"""The routes see a runtime only through facade.RuntimeAPI; a refusal is a 4xx, a bug a 500."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loraplane.api.wire import AdapterInfo, AdapterList, AdapterLoadRequest, AdapterUnloaded
from loraplane.runtime.adapters.errors import AdapterNotFound
from loraplane.runtime.facade import Limits
from loraplane.runtime.outputs import InvalidRequest, RequestStream
from loraplane.runtime.sampling import SamplingParams
from loraplane.runtime.server import create_app

SERVER = Path(__file__).resolve().parents[2] / "src" / "loraplane" / "runtime" / "server"
# What server/ may import of the runtime: the facade and the plain types it speaks in.
ALLOWED = {
    "loraplane.runtime.facade",
    "loraplane.runtime.outputs",
    "loraplane.runtime.sampling",
    "loraplane.runtime.adapters.errors",
    "loraplane.runtime.server",
}


def test_the_routes_import_only_the_facade_of_the_runtime():
    import ast

    seen = set()
    for path in SERVER.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            module = getattr(node, "module", None) if isinstance(node, ast.ImportFrom) else None
            if module and module.startswith("loraplane.runtime"):
                seen.add((module, path.name))
    bad = {(m, f) for m, f in seen if not any(m.startswith(a) for a in ALLOWED)}
    assert not bad, f"routes reach past the facade: {sorted(bad)}"


class FakeRuntime:
    """A RuntimeAPI whose submit raises what the test says: no model, no engine."""

    base_name = "tiny"
    base_source = "/models/tiny"
    started_at = 0.0
    limits = Limits(64, 512, 16, 1 << 20, 1.0)
    admin_token = None
    has_chat_template = False

    def __init__(self) -> None:
        self.raises: Exception = RuntimeError("unset")
        self.answer_readiness = threading.Event()
        self.answer_readiness.set()

    def submit(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        adapter: str | None,
        loop: asyncio.AbstractEventLoop,
    ) -> list[RequestStream]:
        raise self.raises

    def encode(self, text: str, special: bool) -> list[int]:
        return [1] * len(text.split())

    def chat_text(self, messages: list[dict[str, str]]) -> str:
        raise AssertionError("no template")

    def is_special(self, token_id: int) -> bool:
        return False

    def readiness(self) -> str | None:
        # Blocks as a call to a busy engine process can: until the test lets it answer.
        assert self.answer_readiness.wait(30), "readiness was never let through"
        return None

    def metrics_text(self) -> bytes:
        return b""

    def start(self) -> None:
        pass

    def preload_adapters(self) -> None:
        pass

    def stop_taking_requests(self) -> None:
        pass

    def idle(self) -> bool:
        return True

    def stop(self) -> None:
        pass

    def served_adapter(self, name: str) -> AdapterInfo:
        raise AdapterNotFound(f"adapter {name!r} is not loaded")

    def served_adapters(self) -> list[AdapterInfo]:
        return []

    def list_adapters(self) -> AdapterList:
        return AdapterList(adapters=[])

    def get_adapter(self, name: str) -> AdapterInfo:
        return self.served_adapter(name)

    def load_adapter(self, name: str, body: AdapterLoadRequest) -> tuple[AdapterInfo, bool]:
        raise AdapterNotFound(f"source {body.source} not found")

    def unload_adapter(self, name: str) -> AdapterUnloaded:
        raise AdapterNotFound(f"adapter {name!r} is not loaded")


@pytest.fixture
def fake():
    runtime = FakeRuntime()
    with TestClient(create_app(runtime), raise_server_exceptions=False) as client:
        yield runtime, client


def test_an_invalid_request_is_the_clients_and_a_bug_is_a_500_that_says_so(fake):
    runtime, client = fake
    body = {"model": "tiny", "prompt": "hello there"}
    runtime.raises = InvalidRequest("the prompt is empty")
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "validation", r.text
    tgi = client.post("/generate", json={"inputs": "hello"})
    assert tgi.status_code == 422 and tgi.json()["error_type"] == "validation", tgi.text
    runtime.raises = ValueError("a bug deep inside")  # not the client's fault
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 500, r.text
    assert r.json()["error"]["code"] == "internal" and "a bug" not in r.text
    r = client.post("/v1/completions", json=body | {"model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_slow_engine_call_never_holds_up_the_event_loop():
    """The runtime's calls run off the loop: while one waits (on the engine's process, say),
    every other request is still answered."""
    import httpx

    runtime = FakeRuntime()
    runtime.answer_readiness.clear()
    app = create_app(runtime)

    async def main() -> list[str]:
        done: list[str] = []
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

            async def get(path: str) -> None:
                r = await client.get(path)
                assert r.status_code == 200, r.text
                done.append(path)

            ready = asyncio.create_task(get("/readyz"))
            await get("/healthz")
            await get("/metrics")
            runtime.answer_readiness.set()
            await ready
        return done

    assert asyncio.run(main()) == ["/healthz", "/metrics", "/readyz"]
