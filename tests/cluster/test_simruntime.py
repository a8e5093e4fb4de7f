"""kwok pods at scale: readiness gates as a kubelet keeps them, and the simulated runtime
answering the runtime's contract on each pod's own IP."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e.cluster.testing import KWOK_SET, KWOK_TOLERATION, Kube, is_ready, kwok_nodes, wait_for
from e2e.simruntime.launch import simruntime
from e2e.simruntime.pods import RESTART_ANNOTATION
from e2e.simruntime.routes import bindable
from e2e.simruntime.server import POD_HEADER
from prometheus_client.parser import text_string_to_metric_families

from loraplane.api.wire import (
    ADMIN_TOKEN_ENV,
    METRIC_IN_FLIGHT,
    METRIC_REQUESTS,
    READINESS_GATE,
    AdapterList,
)

REPLICAS = 20
TOKEN = "sim-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def local(kube: Kube) -> Kube:
    if kube.local is None:
        pytest.skip("kwok and its stages run with the local control plane")
    return kube


@pytest.fixture
def nodes(local: Kube, namespace: str) -> Iterator[list[str]]:
    with kwok_nodes(local, f"{namespace}-", count=3, gpus=8) as names:
        wait_for(
            lambda: all(is_ready(local.get_json("node", n)) for n in names), 60, "kwok nodes Ready"
        )
        yield names


def kwok_pod_spec(namespace: str, container: dict, gates: bool = False) -> dict:
    spec = {
        "nodeSelector": {KWOK_SET: namespace},
        "tolerations": [KWOK_TOLERATION],
        "containers": [container],
    }
    if gates:
        spec["readinessGates"] = [{"conditionType": READINESS_GATE}]
    return spec


def condition(pod: dict, kind: str) -> dict | None:
    return next((c for c in pod["status"].get("conditions") or () if c["type"] == kind), None)


def set_gate(kube: Kube, namespace: str, pod: str, status: str) -> None:
    patch = {"status": {"conditions": [{"type": READINESS_GATE, "status": status}]}}
    kube.kubectl(
        "patch", "pod", pod, "-n", namespace, "--subresource=status", "-p", json.dumps(patch)
    )


def test_a_kwok_pod_is_ready_only_while_its_readiness_gate_is_true(
    local: Kube, namespace: str, nodes: list[str]
) -> None:
    container = {
        "name": "c",
        "image": "never-pulled",
        "resources": {"limits": {"nvidia.com/gpu": "1"}},
    }
    pods = [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
        for name, spec in (
            ("gated", kwok_pod_spec(namespace, container, gates=True)),
            ("plain", kwok_pod_spec(namespace, container)),
        )
    ]
    body = {"apiVersion": "v1", "kind": "List", "items": pods}
    local.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(body))

    def get(name: str) -> dict:
        return local.get_json("pod", name, "-n", namespace)

    wait_for(lambda: is_ready(get("plain")), 60, "the pod without gates to be Ready")
    # The gated pod's containers are ready, and kwok said why the pod is not.
    pod = wait_for(
        lambda: (p := get("gated"))["status"].get("phase") == "Running" and p, 60, "gated Running"
    )
    assert condition(pod, "ContainersReady")["status"] == "True", pod["status"]
    ready = condition(pod, "Ready")
    assert (ready["status"], ready.get("reason")) == ("False", "ReadinessGatesNotReady"), (
        f"{ready}: kwok runs without e2e/cluster/kwok-stages/ (the cluster started before "
        "they were built): run e2e/cluster/build.sh kwok, then restart the cluster"
    )
    assert condition(pod, READINESS_GATE) is None  # kwok never sets the operator's gate

    set_gate(local, namespace, "gated", "True")
    wait_for(lambda: is_ready(get("gated")), 30, "Ready once the gate is True")
    set_gate(local, namespace, "gated", "False")
    wait_for(lambda: not is_ready(get("gated")), 30, "NotReady once the gate is False again")
    assert condition(get("gated"), READINESS_GATE)["status"] == "False"  # ours, not kwok's


def runtime_deployment(namespace: str) -> dict:
    container = {
        "name": "runtime",
        "image": "never-pulled",
        "command": [
            "loraplane-runtime",
            "--model",
            "hf://org/tiny",
            "--served-model-name",
            "tiny",
            "--host",
            "$(POD_IP)",
            "--port",
            "8000",
        ],
        "ports": [{"name": "http", "containerPort": 8000}],
        "env": [
            {
                "name": ADMIN_TOKEN_ENV,
                "valueFrom": {"secretKeyRef": {"name": "admin", "key": "token"}},
            }
        ],
        "resources": {"limits": {"nvidia.com/gpu": "1"}},
    }
    labels = {"app": "sim"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "sim"},
        "spec": {
            "replicas": REPLICAS,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": kwok_pod_spec(namespace, container),
            },
        },
    }


def answering_pod(client: httpx.Client, ip: str) -> str | None:
    """The pod name the runtime on ip:8000 answers as; None when nothing listens there."""
    try:
        r = client.get(f"http://{ip}:8000/healthz")
    except httpx.TransportError:
        return None
    return r.headers.get(POD_HEADER)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    # trust_env=False: a proxy from the environment must never see pod IPs.
    with httpx.Client(timeout=5, trust_env=False) as c:
        yield c


def test_the_simulated_runtime_answers_on_every_kwok_pod_ip(
    local: Kube, namespace: str, nodes: list[str], client: httpx.Client, tmp_path: Path
) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "admin"},
        "stringData": {"token": TOKEN},
    }
    body = {"apiVersion": "v1", "kind": "List", "items": [secret, runtime_deployment(namespace)]}
    local.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(body))

    def running() -> dict[str, str]:
        items = local.get_json("pods", "-n", namespace, "-l", "app=sim")["items"]
        ips = {
            p["metadata"]["name"]: p["status"].get("podIP")
            for p in items
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        }
        return ips if len(ips) == REPLICAS and all(ips.values()) else {}

    ips = wait_for(running, 120, f"{REPLICAS} kwok pods Running with IPs")
    if os.geteuid() != 0 and not bindable(next(iter(ips.values()))):
        pytest.skip("kwok pod IPs are not bindable here and adding a route needs root")
    log = tmp_path / "simruntime.log"
    with simruntime(local.kubeconfig, log, namespaces=(namespace,)):
        try:
            check_every_pod(local, namespace, client, ips)
        except BaseException:
            print(f"--- simruntime log ---\n{log.read_text()[-4000:]}")
            raise


def check_every_pod(kube: Kube, namespace: str, client: httpx.Client, ips: dict[str, str]) -> None:
    wait_for(
        lambda: all(answering_pod(client, ip) == name for name, ip in ips.items()),
        60,
        f"the simulated runtime to answer on all {len(ips)} pod IPs, each as its own pod",
    )
    for ip in ips.values():
        url = f"http://{ip}:8000/v1/adapters"
        assert client.put(f"{url}/sql", json={"source": "hf://org/sql"}).status_code == 401
        assert client.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = client.put(f"{url}/sql", json={"source": "hf://org/sql"}, headers=AUTH)
        assert r.status_code == 201, r.text
        r = client.put(f"{url}/sql", json={"source": "hf://org/sql"}, headers=AUTH)
        assert r.status_code == 200, r.text
        r = client.put(f"{url}/bad", json={"source": "hf://org/fail-incompatible"}, headers=AUTH)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "incompatible")
        listed = AdapterList.model_validate(client.get(url, headers=AUTH).json()).adapters
        assert [(a.name, a.state) for a in listed] == [("sql", "loaded")]
        r = client.post(f"http://{ip}:8000/v1/completions", json={"model": "sql", "prompt": "x"})
        assert r.status_code == 200, r.text
        families = {
            f.name: f
            for f in text_string_to_metric_families(client.get(f"http://{ip}:8000/metrics").text)
        }
        served = [s for s in families[METRIC_REQUESTS].samples if s.name.endswith("_total")]
        assert [(s.labels, s.value) for s in served] == [
            ({"adapter": "sql", "status": "success"}, 1.0)
        ]
        assert METRIC_IN_FLIGHT in families
        assert client.delete(f"{url}/sql", headers=AUTH).status_code == 200
        assert client.get(f"{url}/sql", headers=AUTH).status_code == 404

    # A restart (as after an OOM kill) comes back empty, with a new restartCount and containerID.
    name, ip = sorted(ips.items())[0]
    url = f"http://{ip}:8000/v1/adapters"
    assert (
        client.put(f"{url}/sql", json={"source": "hf://org/sql"}, headers=AUTH).status_code == 201
    )
    kube.kubectl("annotate", "pod", name, "-n", namespace, f"{RESTART_ANNOTATION}=1")

    def restarted() -> dict | None:
        cs = kube.get_json("pod", name, "-n", namespace)["status"]["containerStatuses"][0]
        return cs if cs["restartCount"] == 1 else None

    cs = wait_for(restarted, 30, f"pod {name}'s restartCount to become 1")
    assert cs["containerID"].endswith("-1"), cs
    assert AdapterList.model_validate(client.get(url, headers=AUTH).json()).adapters == []

    # A deleted pod stops answering (its IP may come back for another pod, never as it).
    name, ip = sorted(ips.items())[1]
    kube.kubectl("delete", "pod", name, "-n", namespace, "--wait=true")
    wait_for(lambda: answering_pod(client, ip) != name, 30, f"deleted pod {name} to stop answering")
