"""The router on the local cluster: real runtime pods, the router as pods behind its Service.

Residency: three runtime pods hold different subsets of the adapters (written into each
LoraAdapter's status as the operator writes its verified residency; the operator itself loads
every adapter everywhere, so it is not running here), and every request through the router
must land on a pod that holds its adapter, measured by the pods' own counters.

With the operator: the endpoint in status answers like the pods (equal to PEFT), a pod
deleted under load loses no request, and a base scaled to zero is woken by a held request.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from e2e.cluster.testing import Kube, delete_namespace, new_namespace, wait_for
from operator_helpers import (
    BASE,
    MAX_TOKENS,
    PROMPT_IDS,
    Operator,
    adapter,
    adapter_ready,
    apply,
    base_model,
    condition,
    fleet_ready,
    kill_runtime,
    peft_greedy_ids,
    runtime_pods,
)
from prometheus_client.parser import text_string_to_metric_families

from loraplane.api import BaseModelDeployment
from loraplane.api.wire import READINESS_GATE, ROUTER_METRICS_PORT
from loraplane.operator import manifests, routing
from loraplane.operator.config import OperatorConfig
from loraplane.operator.rates import parse_metrics

ADAPTERS = {"sql-expert": "sql-expert", "Poet_v2": "poet", "support-bot": "support-bot"}
"""served name -> the demo adapter it serves."""
TOKEN = "router-test-admin-token"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from loraplane.testing.tiny import build_demo

    base, adapters = build_demo(tmp_path_factory.mktemp("router-models"))
    return {"base": base, **adapters}


@pytest.fixture(scope="module")
def expected(models: dict[str, Path]) -> dict[str, str]:
    """served name -> PEFT's greedy text for PROMPT_IDS (the base under its own name)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models["base"]))
    out = {
        served: tok.decode(peft_greedy_ids(models["base"], models[name]), skip_special_tokens=True)
        for served, name in ADAPTERS.items()
    }
    out[BASE] = tok.decode(peft_greedy_ids(models["base"], None), skip_special_tokens=True)
    assert len(set(out.values())) == 4, "the adapters must differ to prove anything"
    return out


@pytest.fixture(scope="module")
def routed(kube: Kube) -> None:
    if kube.local is None:
        pytest.skip("runs runtime and router pods as local processes: needs the node agent")
    net = kube.local.pod_network()
    if net is None or not net.routed:
        why = "no pod network" if net is None else net.reason
        pytest.skip(f"the router's Service needs pods on routed addresses: {why}")


# ---- helpers --------------------------------------------------------------------------------


def router_urls(kube: Kube, ns: str) -> list[str]:
    """The router's ready endpoints, from its Service's EndpointSlices (no ClusterIP here)."""
    slices = kube.get_json(
        "endpointslices", "-n", ns, "-l", f"kubernetes.io/service-name={routing.name(BASE)}"
    )["items"]
    urls = []
    for s in slices:
        port = (s.get("ports") or [{}])[0].get("port")
        for ep in s.get("endpoints") or []:
            if ep["conditions"].get("ready") and port:
                urls.append(f"http://{ep['addresses'][0]}:{port}")
    return sorted(urls)


def router_pods(kube: Kube, ns: str) -> list[dict]:
    selector = ",".join(f"{k}={v}" for k, v in routing.selector_labels(BASE).items())
    return kube.get_json("pods", "-n", ns, "-l", selector)["items"]


def router_sum(kube: Kube, ns: str, sample: str, **labels: str) -> float:
    """A sample of the routers' /metrics, summed over the router pods and matching labels."""
    total = 0.0
    for pod in router_pods(kube, ns):
        if not pod["status"].get("podIP") or pod["metadata"].get("deletionTimestamp"):
            continue
        text = httpx.get(f"http://{pod['status']['podIP']}:{ROUTER_METRICS_PORT}/metrics").text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
    return total


def pod_counts(pod: dict) -> dict[str, float]:
    """Requests a runtime pod finished, by adapter, from its own /metrics."""
    r = httpx.get(f"http://{pod['status']['podIP']}:8000/metrics", timeout=10)
    return dict(parse_metrics(r.text).by_adapter)


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def completion_text(client: openai.OpenAI, model: str, stream: bool = False) -> str:
    kwargs: dict[str, Any] = {"model": model, "prompt": PROMPT_IDS, "max_tokens": MAX_TOKENS}
    if not stream:
        return client.completions.create(temperature=0, **kwargs).choices[0].text
    parts = client.completions.create(temperature=0, stream=True, **kwargs)
    return "".join(c.choices[0].text for c in parts if c.choices)


def explain(kube: Kube, ns: str, op: Operator | None = None) -> None:
    print(kube.explain(ns))
    for pod in router_pods(kube, ns):
        print(f"--- router pod {pod['metadata']['name']}: {pod['status'].get('podIP')}")
    if op is not None:
        print(f"--- operator log ---\n{op.log.read_text()[-6000:]}")


# ---- residency: adapters on different subsets of three pods ---------------------------------

SUBSETS = {"sql-expert": (0,), "Poet_v2": (1, 2), "support-bot": (0, 2)}
"""served name -> indexes of the pods that hold it."""


def _as_operator_would(kube: Kube, ns: str, models: dict[str, Path], cache: Path) -> dict:
    """The base's runtime pods and router, with adapters loaded on SUBSETS and reported."""
    apply(kube, ns, base_model(models["base"], replicas=3))
    body = kube.get_json("bmd", BASE, "-n", ns)
    meta = {k: body["metadata"][k] for k in ("name", "namespace", "uid")}
    bmd = BaseModelDeployment.model_validate({"metadata": meta, "spec": body["spec"]})
    config = OperatorConfig(cache_root=str(cache))
    for obj in (manifests.admin_secret(bmd, TOKEN), manifests.deployment(bmd, config, 3)):
        apply(kube, ns, obj)

    def started() -> list[dict] | None:
        pods = runtime_pods(kube, ns)
        up = [p for p in pods if condition(p, "ContainersReady").get("status") == "True"]
        return sorted(up, key=lambda p: p["metadata"]["name"]) if len(up) == 3 else None

    pods = wait_for(started, 240, "3 runtime pods running")
    names = [p["metadata"]["name"] for p in pods]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for served, on in SUBSETS.items():
        name = ADAPTERS[served]
        spec = {"servedName": served} if served != name else {}
        apply(kube, ns, adapter(name, models[name], **spec))
        for i in on:
            r = httpx.put(
                f"http://{pods[i]['status']['podIP']}:8000/v1/adapters/{served}",
                json={"source": f"file://{models[name]}"},
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=60,
            )
            assert r.status_code in (200, 201), r.text
        rows = [{"pod": names[i], "state": "Loaded", "loadedAt": now} for i in on]
        rows += [{"pod": names[i], "state": "Pending"} for i in range(3) if i not in on]
        ready = {
            "type": "Ready",
            "status": "True",
            "reason": "Loaded",
            "message": "",
            "lastTransitionTime": now,
        }
        status = {"status": {"servedName": served, "replicas": rows, "conditions": [ready]}}
        kube.kubectl(
            "patch", "lora", name, "-n", ns, "--subresource=status", "--type=merge",
            "-p", json.dumps(status),
        )  # fmt: skip
    for pod in pods:  # every pod holds what it should: open its gate
        gate = {"type": READINESS_GATE, "status": "True", "lastTransitionTime": now}
        kube.kubectl(
            "patch", "pod", pod["metadata"]["name"], "-n", ns, "--subresource=status",
            "-p", json.dumps({"status": {"conditions": [gate]}}),
        )  # fmt: skip
    for obj in routing.children(bmd, config):
        apply(kube, ns, obj)
    return {"pods": pods, "names": names}


@pytest.fixture(scope="module")
def subsets(kube: Kube, crds: list[str], routed: None, models, tmp_path_factory) -> Iterator[dict]:
    ns = new_namespace(kube, "router-residency")
    try:
        state = _as_operator_would(kube, ns, models, tmp_path_factory.mktemp("router-cache"))
        state["urls"] = wait_for(
            lambda: (urls := router_urls(kube, ns)) and len(urls) == 2 and urls,
            120,
            "2 ready router endpoints in the router Service's EndpointSlices",
        )
        state["ns"] = ns
        yield state
    except BaseException:
        explain(kube, ns)
        raise
    finally:
        delete_namespace(kube, ns)


def test_every_request_lands_on_a_pod_holding_its_adapter(
    kube: Kube, subsets: dict, expected: dict[str, str]
) -> None:
    ns, pods, names = subsets["ns"], subsets["pods"], subsets["names"]
    before = {p["metadata"]["name"]: pod_counts(p) for p in pods}
    rounds = 4
    for url in subsets["urls"]:  # each router pod on its own
        client = client_for(url)
        for _ in range(rounds):
            for served in SUBSETS:
                assert completion_text(client, served) == expected[served], (url, served)
            assert completion_text(client, "Poet_v2", stream=True) == expected["Poet_v2"]
        tgi = httpx.post(
            f"{url}/generate",
            json={
                "inputs": "hello",
                "parameters": {"adapter_id": "sql-expert", "max_new_tokens": 2},
            },
            timeout=60,
        )
        assert tgi.status_code == 200, tgi.text
    after = {p["metadata"]["name"]: pod_counts(p) for p in pods}
    hits = total = 0
    for served, on in SUBSETS.items():
        for i, name in enumerate(names):
            n = after[name].get(served, 0.0) - before[name].get(served, 0.0)
            total += n
            hits += n if i in on else 0
    ratio = hits / total
    print(f"residency hit ratio: {hits:.0f}/{total:.0f} = {ratio:.3f}")
    assert total == len(subsets["urls"]) * (rounds * (len(SUBSETS) + 1) + 1)
    assert ratio == 1.0
    assert router_sum(kube, ns, "loraplane_router_routed_total", residency="fallback") == 0
    assert router_sum(kube, ns, "loraplane_router_routed_total", residency="hit") == total


def test_models_lists_the_base_and_every_ready_adapter(subsets: dict) -> None:
    listed = client_for(subsets["urls"][0]).models.list()
    assert [m.id for m in listed.data] == [BASE, *sorted(SUBSETS)]
    assert {m.id: m.model_dump().get("parent") for m in listed.data}["sql-expert"] == BASE


def test_an_unknown_adapter_gets_the_runtimes_404(subsets: dict) -> None:
    url = subsets["urls"][0]
    with pytest.raises(openai.NotFoundError) as err:
        completion_text(client_for(url), "no-such-adapter")
    assert err.value.code == "model_not_found"
    direct = httpx.post(
        f"http://{subsets['pods'][0]['status']['podIP']}:8000/v1/completions",
        json={"model": "no-such-adapter", "prompt": PROMPT_IDS},
        timeout=30,
    )
    routed = httpx.post(
        f"{url}/v1/completions", json={"model": "no-such-adapter", "prompt": PROMPT_IDS}, timeout=30
    )
    assert routed.status_code == direct.status_code == 404
    assert routed.json()["error"].keys() == direct.json()["error"].keys()
    assert {k: v for k, v in routed.json()["error"].items() if k != "message"} == {
        k: v for k, v in direct.json()["error"].items() if k != "message"
    }


def test_the_router_never_offers_the_admin_api(subsets: dict) -> None:
    url = subsets["urls"][0]
    r = httpx.put(
        f"{url}/v1/adapters/evil",
        json={"source": "https://evil.example/a"},
        headers={"Authorization": f"Bearer {TOKEN}"},  # even with the pods' own token
        timeout=10,
    )
    assert r.status_code == 404
    assert httpx.get(f"{url}/v1/adapters", timeout=10).status_code == 404


def test_api_keys_from_the_secret_guard_the_endpoint(kube: Kube, subsets: dict) -> None:
    ns, url = subsets["ns"], subsets["urls"][0]
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": f"{BASE}-api-keys"},
        "data": {"team-a": base64.b64encode(b"k-123").decode()},
    }
    apply(kube, ns, secret)
    try:

        def status(key: str | None) -> int:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return httpx.get(f"{url}/v1/models", headers=headers, timeout=10).status_code

        wait_for(lambda: status(None) == 401, 30, "the router to require a key (watch)")
        assert status("wrong") == 401 and status("k-123") == 200
    finally:
        kube.kubectl("delete", "secret", f"{BASE}-api-keys", "-n", ns)
    wait_for(lambda: httpx.get(f"{url}/v1/models", timeout=10).status_code == 200, 30, "open")


# ---- with the operator: the endpoint, a pod lost under load, waking from zero ---------------


def endpoint_urls(kube: Kube, ns: str) -> list[str]:
    """The router endpoints behind status.endpoint, which must name the router's Service."""
    bmd = kube.get_json("bmd", BASE, "-n", ns)
    endpoint = (bmd.get("status") or {}).get("endpoint")
    assert endpoint == f"http://{routing.name(BASE)}.{ns}.svc:8000", endpoint
    return router_urls(kube, ns)


@pytest.fixture(scope="module")
def served(
    kube: Kube, crds: list[str], operator_role: str, routed: None, models, tmp_path_factory
) -> Iterator[dict]:
    ns = new_namespace(kube, "router-operator")
    op = Operator(kube, ns, tmp_path_factory.mktemp("router-operator") / "operator.log")
    op.start()
    try:
        apply(kube, ns, base_model(models["base"], replicas=2))
        for served_name, name in ADAPTERS.items():
            spec = {"servedName": served_name} if served_name != name else {}
            apply(kube, ns, adapter(name, models[name], **spec))
        wait_for(lambda: fleet_ready(kube, ns, 2), 300, "2 Ready runtime pods")
        for name in ADAPTERS.values():
            wait_for(lambda n=name: adapter_ready(kube, ns, n, 2), 120, f"{name} on 2 pods")
        urls = wait_for(
            lambda: len(u := endpoint_urls(kube, ns)) == 2 and u, 120, "2 ready routers"
        )
        yield {"ns": ns, "op": op, "urls": urls}
    except BaseException:
        explain(kube, ns, op)
        raise
    finally:
        op.stop()
        delete_namespace(kube, ns)


def test_the_endpoint_in_status_answers_like_peft(served: dict, expected: dict[str, str]) -> None:
    client = client_for(served["urls"][0])
    for model, text in expected.items():
        assert completion_text(client, model) == text, model
        assert completion_text(client, model, stream=True) == text, model


class Load:
    """Clients sending completions through the router in threads, every answer recorded."""

    def __init__(self, urls: list[str], expected: dict[str, str], clients: int = 4) -> None:
        self.urls, self.expected = urls, expected
        self.results: list[tuple[str, int, str]] = []  # (model, status, text or error)
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=180)

    def _run(self, i: int) -> None:
        models = sorted(self.expected)
        with httpx.Client(base_url=self.urls[i % len(self.urls)], timeout=120) as client:
            n = i
            while not self.stop.is_set():
                model = models[n % len(models)]
                n += 1
                body = {"model": model, "prompt": PROMPT_IDS, "max_tokens": MAX_TOKENS}
                try:
                    r = client.post("/v1/completions", json={**body, "temperature": 0})
                    text = r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
                    self.results.append((model, r.status_code, text))
                except httpx.HTTPError as e:
                    self.results.append((model, -1, repr(e)))

    def wrong(self) -> list[tuple[str, int, str]]:
        return [(m, s, t) for m, s, t in self.results if s != 200 or t != self.expected[m]]


@pytest.mark.parametrize("how", ["deleted", "force-deleted", "runtime-killed"])
def test_a_pod_lost_under_load_loses_no_request(
    kube: Kube, served: dict, expected: dict[str, str], how: str
) -> None:
    """Deleted: the runtime drains and the router stops sending to it at once. Force-deleted:
    it vanishes from the API before its process stops. Runtime killed: the pod stays, Ready,
    while its process is gone, until the operator closes its gate; the router retries what
    broke on the other pod."""
    ns = served["ns"]
    victim = runtime_pods(kube, ns)[0]
    name = victim["metadata"]["name"]
    restarts = victim["status"]["containerStatuses"][0].get("restartCount", 0)
    retried_before = router_sum(kube, ns, "loraplane_router_upstream_errors_total")
    with Load(served["urls"], expected) as load:
        wait_for(lambda: len(load.results) >= 8, 120, "load through the router")
        before = len(load.results)
        if how == "runtime-killed":
            kill_runtime(victim)
        else:
            force = ("--grace-period=0", "--force") if how == "force-deleted" else ()
            kube.kubectl("delete", "pod", name, "-n", ns, "--wait=false", *force)

        def back() -> bool:
            pods = {p["metadata"]["name"]: p for p in runtime_pods(kube, ns)}
            if how == "runtime-killed":
                count = pods[name]["status"]["containerStatuses"][0].get("restartCount", 0)
                if count <= restarts:
                    return False
            elif name in pods:
                return False
            return bool(fleet_ready(kube, ns, 2))

        wait_for(back, 300, "the pod back, or replaced, Ready with its adapters")
        after = len(load.results)
        wait_for(lambda: len(load.results) >= after + 8, 120, "load on both pods again")
    retried = router_sum(kube, ns, "loraplane_router_upstream_errors_total") - retried_before
    print(
        f"pod {how} under load: {len(load.results)} requests ({after - before} until it was "
        f"back), {len(load.wrong())} lost or wrong, {retried:.0f} tries failed over"
    )
    assert load.wrong() == []


def test_a_base_at_zero_wakes_for_a_held_request(
    kube: Kube, served: dict, expected: dict[str, str]
) -> None:
    ns = served["ns"]
    autoscaling = {
        "enabled": True,
        "minReplicas": 0,
        "maxReplicas": 1,
        "targetRequestsPerSecond": "1",
        "stableWindowSeconds": 6,
        "panicWindowSeconds": 3,
        "scaleDownStabilizationSeconds": 0,
        "scaleToZeroIdleSeconds": 30,
    }
    kube.kubectl(
        "patch", "bmd", BASE, "-n", ns, "--type=merge",
        "-p", json.dumps({"spec": {"autoscaling": autoscaling}}),
    )  # fmt: skip

    def at_zero() -> bool:
        bmd = kube.get_json("bmd", BASE, "-n", ns)
        return (bmd.get("status") or {}).get("desiredReplicas") == 0 and not runtime_pods(kube, ns)

    wait_for(at_zero, 180, "the idle base to go to zero")
    url = router_urls(kube, ns)[0]
    result: dict[str, Any] = {}

    def ask() -> None:
        started = time.monotonic()
        try:
            result["text"] = completion_text(client_for(url), "Poet_v2")
        except Exception as e:
            result["error"] = e
        result["seconds"] = time.monotonic() - started

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    held = wait_for(
        lambda: router_sum(kube, ns, "loraplane_router_held_requests"),
        30,
        "the router to hold the request (its demand)",
    )
    assert held == 1

    def woken() -> bool:
        bmd = kube.get_json("bmd", BASE, "-n", ns)
        return ((bmd.get("status") or {}).get("desiredReplicas") or 0) >= 1

    wait_for(woken, 60, "the operator to wake the base for the held request")
    asker.join(timeout=300)
    assert not asker.is_alive(), "the held request never got an answer"
    assert "error" not in result, result
    assert result["text"] == expected["Poet_v2"]
    print(f"woken from zero: answered after {result['seconds']:.1f}s held")
    assert router_sum(kube, ns, "loraplane_router_held_requests") == 0
