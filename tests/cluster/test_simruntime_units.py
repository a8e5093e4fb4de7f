"""The simulated runtime without a cluster: its rules, its pod parsing and its HTTP answers,
each checked against what the real runtime does."""

from __future__ import annotations

import asyncio
import base64

import pytest
from aiohttp.test_utils import TestClient, TestServer
from e2e.simruntime import pods
from e2e.simruntime.config import ERROR_STATUS, FailRule, SimConfig
from e2e.simruntime.runtime import PodIdentity, SimError, SimRuntime
from e2e.simruntime.server import POD_HEADER, create_app
from prometheus_client.parser import text_string_to_metric_families

from loraplane.api.wire import (
    ADMIN_TOKEN_ENV,
    METRIC_IN_FLIGHT,
    METRIC_QUEUE_DEPTH,
    METRIC_REQUESTS,
    AdapterErrorCode,
    AdapterInfo,
    AdapterList,
    AdapterLoadRequest,
    ErrorBody,
)

POD = PodIdentity(namespace="ns", name="p-0", base_name="tiny", model="hf://o/tiny", max_adapters=2)


def sim(**config) -> SimRuntime:
    return SimRuntime(POD, SimConfig(load_seconds=config.pop("load_seconds", 0.0), **config))


def req(source: str, **kw) -> AdapterLoadRequest:
    return AdapterLoadRequest(source=source, **kw)


# -- the contract twins ------------------------------------------------------------------------
def test_error_statuses_are_the_real_runtimes() -> None:
    from loraplane.runtime.adapters import errors

    real = {
        cls.kind: cls.status
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.AdapterError)
    }
    assert {c.value: s for c, s in ERROR_STATUS.items()} == real
    assert set(ERROR_STATUS) == set(AdapterErrorCode)


def test_failure_rules() -> None:
    config = SimConfig(fail_rules=(FailRule.parse("-huge-=incompatible"),))
    assert config.failure_for("hf://org/sql") is None
    assert config.failure_for("hf://org/sql-huge-r64")[0] == AdapterErrorCode.INCOMPATIBLE
    code, why = config.failure_for("s3://b/fail-checksum_mismatch/x")
    assert code == AdapterErrorCode.CHECKSUM_MISMATCH and "fail-checksum_mismatch" in why
    assert config.failure_for("s3://b/fail-nonsense/x")[0] == AdapterErrorCode.INVALID_ADAPTER
    with pytest.raises(ValueError, match="unknown code 'nope'"):
        FailRule.parse("x=nope")
    with pytest.raises(ValueError, match="PATTERN=CODE"):
        FailRule.parse("incompatible")


# -- pods ----------------------------------------------------------------------------------------
def runtime_pod(**status) -> dict:
    """A runtime pod as the operator renders one (command, env from a Secret, port named http)."""
    return {
        "metadata": {"namespace": "ns", "name": "p-0", "uid": "u1", "annotations": {}},
        "spec": {
            "nodeName": "kwok-0",
            "containers": [
                {"name": "sidecar", "command": ["sleep", "inf"]},
                {
                    "name": "runtime",
                    "command": [
                        "/usr/bin/loraplane-runtime",
                        "--model",
                        "hf://org/tiny@main",
                        "--served-model-name",
                        "tiny",
                        "--port=8123",
                        "--max-adapters",
                        "4",
                    ],
                    "ports": [{"name": "http", "containerPort": 9000}],
                    "env": [
                        {
                            "name": ADMIN_TOKEN_ENV,
                            "valueFrom": {"secretKeyRef": {"name": "tiny-admin", "key": "token"}},
                        }
                    ],
                },
            ],
        },
        "status": {"phase": "Running", "podIP": "10.244.0.7", **status},
    }


def test_pod_parsing() -> None:
    pod = runtime_pod()
    c = pods.runtime_container(pod, "loraplane-runtime")
    assert c is not None and c["name"] == "runtime"
    assert pods.runtime_container(pod, "other") is None
    assert pods.port_of(c, 8000) == 8123  # --port wins over the named port
    assert pods.port_of({"ports": [{"name": "http", "containerPort": 9000}]}, 8000) == 9000
    assert pods.port_of({}, 8000) == 8000
    ident = pods.identity(pod, c)
    assert (ident.base_name, ident.model, ident.max_adapters) == ("tiny", "hf://org/tiny@main", 4)
    assert pods.token_ref(c) == pods.TokenRef(secret="tiny-admin", key="token")
    assert pods.token_ref({"env": [{"name": ADMIN_TOKEN_ENV, "value": "t"}]}).value == "t"
    assert pods.token_ref({}) is None
    secret = {"data": {"token": base64.b64encode(b"s3cret").decode()}}
    assert pods.secret_value(secret, "token") == "s3cret"
    assert pods.secret_value(secret, "other") is None


def test_serving_address() -> None:
    kwok = {"kwok-0"}
    assert pods.serving_address(runtime_pod(), kwok) == "10.244.0.7"
    assert pods.serving_address(runtime_pod(), {"other"}) is None
    assert pods.serving_address(runtime_pod(phase="Pending"), kwok) is None
    deleting = runtime_pod()
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pods.serving_address(deleting, kwok) is None


def test_restarted_status_counts_and_renames() -> None:
    cs = {"name": "runtime", "restartCount": 2, "containerID": "kwok://u1-runtime-2"}
    other = {"name": "sidecar", "restartCount": 0}
    pod = runtime_pod(containerStatuses=[other, cs])
    out = pods.restarted_status(pod, "runtime", "2026-01-01T00:00:00Z")
    assert out[0] == other
    assert out[1]["restartCount"] == 3 and out[1]["containerID"] == "kwok://u1-runtime-3"
    assert out[1]["state"] == {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
    assert out[1]["lastState"]["terminated"]["exitCode"] == 137


# -- adapter rules, as loraplane.runtime.adapters.manager keeps them ----------------------------
async def test_put_is_idempotent_and_a_new_source_replaces() -> None:
    s = sim()
    info, created = await s.load("sql", req("hf://o/sql"))
    assert created and info.state == "loaded" and info.tier == "gpu"
    again, created = await s.load("sql", req("hf://o/sql", sha256=info.sha256.upper()))
    assert not created and again.loaded_at == info.loaded_at
    _, created = await s.load("sql", req("hf://o/sql", revision="v2"))
    assert created
    await s.load("b", req("hf://o/b"))
    await s.load("c", req("hf://o/c"))
    assert [(a.name, a.tier) for a in s.list()] == [("b", "gpu"), ("c", "cpu"), ("sql", "gpu")]


async def test_a_second_put_of_a_load_in_flight_joins_it() -> None:
    s = sim(load_seconds=0.05)
    first = asyncio.create_task(s.load("sql", req("hf://o/sql")))
    await asyncio.sleep(0)
    assert s.get("sql").state == "loading"
    assert [a.state for a in s.list()] == ["loading"]
    (a, created_a), (b, created_b) = await asyncio.gather(first, s.load("sql", req("hf://o/sql")))
    assert (created_a, created_b) == (True, False) and a == b


async def test_the_newest_put_wins_and_the_replaced_load_conflicts() -> None:
    s = sim(load_seconds=0.05)
    old = asyncio.create_task(s.load("sql", req("hf://o/sql-v1")))
    await asyncio.sleep(0)
    _, created = await s.load("sql", req("hf://o/sql-v2"))
    with pytest.raises(SimError) as e:
        await old
    assert (e.value.status, e.value.code) == (409, "conflict")
    assert created and s.get("sql").source == "hf://o/sql-v2"


async def test_delete_cancels_a_load_in_flight() -> None:
    s = sim(load_seconds=0.05)
    load = asyncio.create_task(s.load("sql", req("hf://o/sql")))
    await asyncio.sleep(0)
    assert s.unload("sql").state == "unloaded"
    with pytest.raises(SimError, match="a DELETE came"):
        await load
    with pytest.raises(SimError) as e:
        s.get("sql")
    assert (e.value.status, e.value.code) == (404, "not_found")


async def test_refusals() -> None:
    s = sim()
    with pytest.raises(SimError) as e:
        await s.load("bad/name", req("hf://o/x"))
    assert (e.value.status, e.value.code) == (400, "invalid_name")
    with pytest.raises(SimError) as e:
        await s.load("x", req("hf://o/fail-source_unreachable/x"))
    assert (e.value.status, e.value.code) == (502, "source_unreachable")
    assert s.list() == []
    with pytest.raises(SimError) as e:
        s.unload("x")
    assert e.value.status == 404


# -- HTTP ------------------------------------------------------------------------------------------
async def test_http_contract() -> None:
    s = sim()
    async with TestClient(TestServer(create_app(s, "tok"))) as client:
        auth = {"Authorization": "Bearer tok"}
        r = await client.put("/v1/adapters/sql", json={"source": "hf://o/sql"})
        assert r.status == 401
        assert ErrorBody.model_validate(await r.json()).error.code == "unauthorized"
        r = await client.get("/v1/adapters", headers={"Authorization": "Bearer nope"})
        assert r.status == 401
        r = await client.put("/v1/adapters/sql", json={"source": "hf://o/sql"}, headers=auth)
        assert r.status == 201 and r.headers[POD_HEADER] == "p-0"
        assert AdapterInfo.model_validate(await r.json()).state == "loaded"
        r = await client.put("/v1/adapters/sql", json={"source": "hf://o/sql"}, headers=auth)
        assert r.status == 200
        r = await client.put("/v1/adapters/x", json={"src": "hf://o/x"}, headers=auth)
        body = ErrorBody.model_validate(await r.json())
        assert r.status == 400 and body.error.code == "validation"
        r = await client.put(
            "/v1/adapters/x", json={"source": "s3://b/fail-incompatible"}, headers=auth
        )
        body = ErrorBody.model_validate(await r.json())
        assert r.status == 422 and body.error.code == "incompatible", body
        r = await client.get("/v1/adapters", headers=auth)
        assert [a.name for a in AdapterList.model_validate(await r.json()).adapters] == ["sql"]

        r = await client.post("/v1/completions", json={"model": "sql", "prompt": "hi"})
        assert r.status == 200 and "with sql" in (await r.json())["choices"][0]["text"]
        r = await client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
        assert r.status == 200
        r = await client.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
        assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"
        r = await client.get("/v1/models")
        assert [m["id"] for m in (await r.json())["data"]] == ["tiny", "sql"]

        r = await client.get("/metrics")
        families = {f.name: f for f in text_string_to_metric_families(await r.text())}
        samples = {
            (x.labels["adapter"], x.labels["status"]): x.value
            for x in families[METRIC_REQUESTS].samples
            if x.name.endswith("_total")
        }
        assert samples == {("sql", "success"): 1.0, ("tiny", "success"): 1.0}
        assert families[METRIC_IN_FLIGHT].samples[0].value == 0
        assert families[METRIC_QUEUE_DEPTH].samples[0].value == 0

        r = await client.delete("/v1/adapters/sql", headers=auth)
        assert r.status == 200 and (await r.json()) == {"name": "sql", "state": "unloaded"}
        r = await client.delete("/v1/adapters/sql", headers=auth)
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        for path in ("/healthz", "/readyz"):
            assert (await client.get(path)).status == 200
        r = await client.get("/nope")
        assert r.status == 404 and (await r.json())["error"]["code"] == "http"
