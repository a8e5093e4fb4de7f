"""Services over node-agent pods: addresses in the clone's routed 10.X/16 get real EndpointSlices
(from the controller-manager's endpoint-slice controller) that follow readiness and readiness
gates, and the host reaches every endpoint address."""

from __future__ import annotations

import ipaddress
import json
import urllib.request

import pytest
from e2e.cluster.podnet import PodNetwork
from e2e.cluster.testing import Kube, wait_for

GATE = "loraplane.io/test-gate"
ON_AGENT = {"loraplane.io/node-agent": "true"}


@pytest.fixture
def routed(kube: Kube) -> PodNetwork:
    if kube.local is None:
        pytest.skip("needs the local control plane's node agent")
    net = kube.local.pod_network()
    if net is None:
        pytest.skip(
            "this cluster was started before pod networks existed: restart it "
            "(make cluster-down cluster-up) to give pods routed addresses"
        )
    if not net.routed:
        pytest.skip(f"pods are on the loopback fallback {net.cidr}: {net.reason}")
    return net


def web(replicas: int) -> list[dict]:
    labels = {"app": "web"}
    container = {
        "name": "web",
        "image": "python:3.11-slim",
        "command": ["python3", "-m", "http.server", "--bind", "$(POD_IP)", "8080"],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [container],
                    "readinessGates": [{"conditionType": GATE}],
                    "nodeSelector": ON_AGENT,
                    "terminationGracePeriodSeconds": 2,
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }
    return [deployment, service]


def endpoints(kube: Kube, ns: str) -> dict[str, dict]:
    """address -> endpoint, over every EndpointSlice of Service web."""
    slices = kube.get_json("endpointslices", "-n", ns, "-l", "kubernetes.io/service-name=web")[
        "items"
    ]
    return {ep["addresses"][0]: ep for s in slices for ep in s.get("endpoints") or []}


def ready_addresses(kube: Kube, ns: str) -> set[str]:
    return {a for a, ep in endpoints(kube, ns).items() if ep["conditions"].get("ready")}


def set_gate(kube: Kube, ns: str, pod: str, status: str) -> None:
    patch = {"status": {"conditions": [{"type": GATE, "status": status}]}}
    kube.kubectl("patch", "pod", pod, "-n", ns, "--subresource=status", "-p", json.dumps(patch))


def test_service_endpoints_follow_pod_readiness_gates(
    kube: Kube, namespace: str, routed: PodNetwork
) -> None:
    body = {"apiVersion": "v1", "kind": "List", "items": web(2)}
    kube.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(body))

    def serving_pods() -> dict[str, str] | None:
        """name -> IP once both pods' containers are ready (the gate still holds them back)."""
        items = kube.get_json("pods", "-n", namespace, "-l", "app=web")["items"]
        ready = {
            p["metadata"]["name"]: p["status"]["podIP"]
            for p in items
            if any(
                c["type"] == "ContainersReady" and c["status"] == "True"
                for c in p["status"].get("conditions") or []
            )
        }
        return ready if len(ready) == 2 else None

    pods = wait_for(serving_pods, 60, "2 web pods with ready containers")
    assert all(ipaddress.IPv4Address(ip) in routed.network for ip in pods.values()), (
        pods,
        routed.cidr,
    )

    # Listed, with the gate closed: not ready, so a Service sends them nothing.
    wait_for(
        lambda: set(endpoints(kube, namespace)) == set(pods.values()),
        60,
        f"EndpointSlices of service/web to list both pod IPs {sorted(pods.values())}",
    )
    assert ready_addresses(kube, namespace) == set()
    for ep in endpoints(kube, namespace).values():
        assert ep["targetRef"]["kind"] == "Pod" and ep["targetRef"]["name"] in pods

    first, second = sorted(pods)
    set_gate(kube, namespace, first, "True")
    wait_for(
        lambda: ready_addresses(kube, namespace) == {pods[first]},
        30,
        f"only {first} ({pods[first]}) ready in the EndpointSlice",
    )
    set_gate(kube, namespace, second, "True")
    wait_for(
        lambda: ready_addresses(kube, namespace) == set(pods.values()),
        30,
        "both pods ready in the EndpointSlice",
    )
    set_gate(kube, namespace, first, "False")
    wait_for(
        lambda: ready_addresses(kube, namespace) == {pods[second]},
        30,
        f"{first} out of the ready endpoints once its gate is False again",
    )

    # The host reaches each endpoint at the port the slice names.
    slices = kube.get_json(
        "endpointslices", "-n", namespace, "-l", "kubernetes.io/service-name=web"
    )
    (port,) = {p["port"] for s in slices["items"] for p in s.get("ports") or []}
    for address in endpoints(kube, namespace):
        with urllib.request.urlopen(f"http://{address}:{port}/", timeout=5) as resp:
            assert resp.status == 200 and b"Directory listing" in resp.read()
