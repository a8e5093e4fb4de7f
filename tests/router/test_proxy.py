"""The router over real HTTP: it picks the holder, streams, retries once, holds, refuses well.

Fake runtime pods and the router run as uvicorn servers on loopback; clients are httpx and
OpenAI's SDK. The router's table is fed directly (the watches have their own cluster test).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from router_objects import BASE, adapter
from router_servers import (
    FakePod,
    closed_port,
    dropping,
    eventually,
    running_router,
    serving,
)

HELD = "loraplane_router_held_requests"


def completion(model: str | None = "sql", **extra) -> dict:
    body = {"prompt": "hi", "max_tokens": 2, **extra}
    if model is not None:
        body["model"] = model
    return body


async def test_requests_go_to_a_pod_holding_their_adapter() -> None:
    a, b = FakePod("a"), FakePod("b")
    async with serving(a.app()) as pa, serving(b.app()) as pb, running_router() as rt:
        rt.add_pod("a", pa)
        rt.add_pod("b", pb)
        rt.put_adapter(adapter("sql", ("b",)))
        async with httpx.AsyncClient(base_url=rt.url, timeout=10) as client:
            for _ in range(6):
                r = await client.post("/v1/completions", json=completion("sql"))
                assert r.status_code == 200 and r.json()["pod"] == "b", r.text
            r = await client.post(
                "/generate", json={"inputs": "hi", "parameters": {"adapter_id": "sql"}}
            )
            assert r.json() == {"pod": "b", "model": "sql", "path": "/generate"}
            base = [(await client.post("/v1/completions", json=completion(None))) for _ in range(4)]
        assert {r.json()["pod"] for r in base} == {"a", "b"}  # the base: every pod, in turn
        assert rt.metric("loraplane_router_routed_total", adapter="sql", residency="hit") == 7
        assert rt.metric("loraplane_router_requests_total", adapter="sql", code="200") == 7


async def test_connections_to_a_pod_are_kept_and_reused() -> None:
    a = FakePod("a")
    async with serving(a.app()) as pa, running_router() as rt:
        rt.add_pod("a", pa)
        async with httpx.AsyncClient(base_url=rt.url, timeout=10) as client:
            for stream in (False, True, False, False, True):
                r = await client.post("/v1/completions", json=completion(None, stream=stream))
                assert r.status_code == 200
        assert len(a.peers) == 5 and len(set(a.peers)) == 1, a.peers


async def test_the_client_key_stays_at_the_router_and_tracing_goes_through() -> None:
    a = FakePod("a")
    async with serving(a.app()) as pa, running_router() as rt:
        rt.add_pod("a", pa)
        async with httpx.AsyncClient(base_url=rt.url, timeout=10) as client:
            headers = {"Authorization": "Bearer k", "traceparent": "00-abc-def-01", "Cookie": "c"}
            r = await client.post("/v1/completions", json=completion(None), headers=headers)
        assert r.status_code == 200
        sent = a.headers[0]
        assert sent["traceparent"] == "00-abc-def-01"
        assert "authorization" not in sent and "cookie" not in sent


async def test_a_stream_reaches_the_client_chunk_by_chunk() -> None:
    a = FakePod("a", mode="slow")
    async with serving(a.app()) as pa, running_router() as rt:
        rt.add_pod("a", pa)
        async with (
            httpx.AsyncClient(base_url=rt.url, timeout=10) as client,
            client.stream("POST", "/v1/completions", json=completion(None, stream=True)) as r,
        ):
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = r.aiter_lines()
            first = await asyncio.wait_for(anext(lines), 10)
            # The pod has not sent its second part yet: the first came through on its own.
            assert json.loads(first.removeprefix("data: "))["part"] == 1
            assert not a.proceed.is_set()
            a.proceed.set()
            rest = [line async for line in lines if line]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[0][6:])["part"] == 2


async def test_openai_sdk_completions_streams_and_models() -> None:
    a = FakePod("a")
    async with serving(a.app()) as pa, running_router() as rt:
        rt.add_pod("a", pa)
        rt.put_adapter(adapter("sql", ("a",)))
        rt.put_adapter(adapter("Poet_v2", ("a",)))
        rt.put_adapter(adapter("loading", (), ready=False))
        client = openai.AsyncOpenAI(base_url=f"{rt.url}/v1", api_key="unused", max_retries=0)
        listed = await client.models.list()
        assert [m.id for m in listed.data] == [BASE, "Poet_v2", "sql"]  # Ready adapters only
        with pytest.raises(openai.NotFoundError) as missing:
            await client.completions.create(model="nope", prompt="hi", max_tokens=2)
        assert missing.value.code == "model_not_found"
        assert "nope" in missing.value.message
        await client.close()


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/"])
async def test_tgi_unknown_adapter_is_the_runtimes_404(path: str) -> None:
    async with running_router() as rt, httpx.AsyncClient(base_url=rt.url, timeout=10) as client:
        r = await client.post(path, json={"inputs": "x", "parameters": {"adapter_id": "nope"}})
    assert r.status_code == 404
    assert r.json()["error_type"] == "not_found" and "nope" in r.json()["error"]


@pytest.mark.parametrize("failure", ["unreachable", "dropped", "draining"])
async def test_a_pod_that_fails_before_answering_is_retried_once_on_another(failure: str) -> None:
    good = FakePod("good")
    draining = FakePod("bad", mode="drain")
    async with (
        serving(good.app()) as pg,
        serving(draining.app()) as pd,
        dropping() as dropped,
        running_router() as rt,
    ):
        bad_port = {"unreachable": closed_port(), "dropped": dropped, "draining": pd}[failure]
        rt.add_pod("bad", bad_port)
        rt.add_pod("good", pg)
        rt.put_adapter(adapter("sql", ("bad",)))  # the holder is tried first
        async with httpx.AsyncClient(base_url=rt.url, timeout=10) as client:
            r = await client.post("/v1/completions", json=completion("sql"))
        assert r.status_code == 200 and r.json()["pod"] == "good", r.text
        assert len(good.received) == 1
        kind = {"unreachable": "unreachable", "dropped": "broken", "draining": "draining"}[failure]
        assert rt.metric("loraplane_router_upstream_errors_total", adapter="sql", kind=kind) == 1


async def test_nothing_is_sent_twice_once_bytes_went_out() -> None:
    cut, other = FakePod("cut", mode="cut"), FakePod("other")
    async with serving(cut.app()) as pc, serving(other.app()) as po, running_router() as rt:
        rt.add_pod("cut", pc)
        rt.add_pod("other", po)
        rt.put_adapter(adapter("sql", ("cut",)))
        got: list[str] = []
        async with httpx.AsyncClient(base_url=rt.url, timeout=10) as client:
            with pytest.raises(httpx.HTTPError):
                async with client.stream(
                    "POST", "/v1/completions", json=completion(stream=True)
                ) as r:
                    async for line in r.aiter_lines():
                        got.append(line)
        assert got and json.loads(got[0][6:])["part"] == 1  # the first part arrived
        assert other.received == []  # and no second answer was asked for
        await eventually(
            lambda: rt.metric("loraplane_router_upstream_errors_total", adapter="sql", kind="cut"),
            10,
            "the cut to be counted",
        )


async def test_when_every_try_fails_the_client_gets_a_502_after_two() -> None:
    async with dropping() as d1, dropping() as d2, running_router() as rt:
        rt.add_pod("p1", d1)
        rt.add_pod("p2", d2)
        async with httpx.AsyncClient(base_url=rt.url, timeout=10) as client:
            r = await client.post("/v1/completions", json=completion(None))
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_failed" and "2 times" in r.text


async def test_a_full_pod_is_tried_elsewhere_and_its_429_passed_on_when_alone() -> None:
    full, other = FakePod("full", mode="overloaded"), FakePod("other")
    async with serving(full.app()) as pf, serving(other.app()) as po, running_router() as rt:
        rt.add_pod("full", pf)
        rt.put_adapter(adapter("sql", ("full",)))
        async with httpx.AsyncClient(base_url=rt.url, timeout=10) as client:
            alone = await client.post("/v1/completions", json=completion("sql"))
            rt.add_pod("other", po)
            elsewhere = await client.post("/v1/completions", json=completion("sql"))
        assert alone.status_code == 429 and alone.json()["error"]["code"] == "overloaded"
        assert elsewhere.status_code == 200 and elsewhere.json()["pod"] == "other"


async def test_a_request_held_at_zero_goes_as_soon_as_a_pod_is_ready() -> None:
    a = FakePod("a")
    async with serving(a.app()) as pa, running_router() as rt:
        rt.put_adapter(adapter("sql", ()))
        async with httpx.AsyncClient(base_url=rt.url, timeout=30) as client:
            pending = asyncio.ensure_future(client.post("/v1/completions", json=completion("sql")))
            await eventually(lambda: rt.metric(HELD, adapter="sql") == 1, 10, "a held request")
            rt.add_pod("a", pa, ready=False)  # starting: still held
            await asyncio.sleep(0)
            assert rt.metric(HELD, adapter="sql") == 1 and not pending.done()
            rt.add_pod("a", pa)  # Ready
            r = await asyncio.wait_for(pending, 10)
        assert r.status_code == 200 and r.json()["pod"] == "a"
        assert rt.metric(HELD, adapter="sql") == 0
        assert rt.metric("loraplane_router_hold_seconds_count", outcome="released") == 1


async def test_holds_are_bounded_and_time_out_with_retry_after() -> None:
    async with (
        running_router(hold_timeout_seconds=0.5, max_held=1, retry_after_seconds=7) as rt,
        httpx.AsyncClient(base_url=rt.url, timeout=30) as client,
    ):
        first = asyncio.ensure_future(client.post("/v1/completions", json=completion(None)))
        await eventually(lambda: rt.metric(HELD, adapter=BASE) == 1, 10, "a held request")
        second = await client.post("/v1/completions", json=completion(None))
        assert second.status_code == 429 and second.headers["retry-after"] == "7"
        assert second.json()["error"]["code"] == "overloaded"
        timed_out = await first
        assert timed_out.status_code == 503 and timed_out.headers["retry-after"] == "7"
        assert timed_out.json()["error"]["code"] == "no_ready_replicas"
        assert "scaled to zero" in timed_out.json()["error"]["message"]
        assert rt.metric(HELD, adapter=BASE) == 0


async def test_a_client_that_leaves_while_held_is_no_longer_demand() -> None:
    async with running_router() as rt:
        async with httpx.AsyncClient(base_url=rt.url, timeout=30) as client:
            pending = asyncio.ensure_future(client.post("/v1/completions", json=completion(None)))
            await eventually(lambda: rt.metric(HELD, adapter=BASE) == 1, 10, "a held request")
            pending.cancel()
        await eventually(lambda: rt.metric(HELD, adapter=BASE) == 0, 10, "the hold to end")
        assert rt.metric("loraplane_router_hold_seconds_count", outcome="gone") == 1


async def test_api_keys_guard_every_route_but_health() -> None:
    a = FakePod("a")
    async with serving(a.app()) as pa, running_router(api_keys_secret="tiny-api-keys") as rt:
        rt.add_pod("a", pa)
        rt.access.update({"data": {"team": "c2VjcmV0"}})  # base64 of "secret"
        async with httpx.AsyncClient(base_url=rt.url, timeout=10) as client:
            denied = await client.post("/v1/completions", json=completion(None))
            tgi = await client.post("/generate", json={"inputs": "x"})
            models = await client.get("/v1/models")
            ok = await client.post(
                "/v1/completions", json=completion(None), headers={"Authorization": "Bearer secret"}
            )
            health = await client.get("/healthz")
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert tgi.status_code == 401 and tgi.json()["error_type"] == "invalid_api_key"
        assert models.status_code == 401
        assert ok.status_code == 200 and health.status_code == 200
        assert len(a.received) == 1


async def test_bodies_over_the_limit_are_refused_before_reaching_a_pod() -> None:
    a = FakePod("a")
    async with serving(a.app()) as pa, running_router(max_body_bytes=1000) as rt:
        rt.add_pod("a", pa)

        async def chunked():
            for _ in range(10):
                yield b" " * 200

        async with httpx.AsyncClient(base_url=rt.url, timeout=10) as client:
            declared = await client.post("/v1/completions", content=b"{" + b" " * 2000 + b"}")
            streamed = await client.post("/v1/completions", content=chunked())
            bad = await client.post("/generate", content=b"not json")
        assert declared.status_code == 413 and streamed.status_code == 413
        assert declared.json()["error"]["code"] == "request_too_large"
        assert bad.status_code == 422 and bad.json()["error_type"] == "validation"
        assert a.received == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v1/adapters/x"),
        ("GET", "/v1/adapters"),
        ("DELETE", "/v1/adapters/x"),
        ("GET", "/metrics"),
    ],
)
async def test_the_runtime_admin_api_and_metrics_are_not_reachable(method: str, path: str) -> None:
    async with running_router() as rt, httpx.AsyncClient(base_url=rt.url, timeout=10) as client:
        r = await client.request(method, path, json={"source": "https://evil.example/x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_a_failed_pod_is_avoided_until_it_has_restarted() -> None:
    good = FakePod("p-restarted")
    async with dropping() as broken, serving(good.app()) as fixed, running_router() as rt:
        rt.add_pod("p", broken)  # the only pod, and its runtime just died
        async with httpx.AsyncClient(base_url=rt.url, timeout=30) as client:
            pending = asyncio.ensure_future(client.post("/v1/completions", json=completion(None)))
            await eventually(lambda: rt.metric(HELD, adapter=BASE) == 1, 10, "the retry to hold")
            rt.add_pod("p", broken)  # still listed Ready: not taken again
            await asyncio.sleep(0)
            assert not pending.done()
            rt.add_pod("p", fixed, ready=False)  # its gate closed: the runtime restarted
            rt.add_pod("p", fixed)  # and reopened
            r = await asyncio.wait_for(pending, 10)
        assert r.status_code == 200 and r.json()["pod"] == "p-restarted"
        assert rt.metric("loraplane_router_upstream_errors_total", adapter=BASE, kind="broken") == 1
