"""End to end on the local stack: a Deployment's processes follow its replica count."""

from __future__ import annotations

import json
import urllib.request

import pytest

from e2e.cluster.testing import Kube, is_ready, wait_for

pytestmark = pytest.mark.e2e


def test_scaling_a_deployment_starts_and_stops_processes(kube: Kube, namespace: str) -> None:
    if kube.local is None:
        pytest.skip("runs pods as local processes: needs the node agent")
    labels = {"app": "web"}
    container = {
        "name": "web",
        "image": "ignored",
        "command": ["python3", "-m", "http.server", "--bind", "$(POD_IP)", "8080"],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
    }
    deploy = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [container],
                    "terminationGracePeriodSeconds": 3,
                    "nodeSelector": {"loraplane.io/node-agent": "true"},
                },
            },
        },
    }
    kube.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(deploy))

    def ready_ips() -> set[str]:
        pods = kube.get_json("pods", "-n", namespace, "-l", "app=web")["items"]
        return {p["status"]["podIP"] for p in pods if is_ready(p)}

    def three() -> set[str] | None:
        got = ready_ips()
        return got if len(got) == 3 else None

    ips = wait_for(three, 60, "3 ready pods")
    for ip in ips:
        with urllib.request.urlopen(f"http://{ip}:8080/", timeout=5) as resp:
            assert resp.status == 200
    kube.kubectl("scale", "deploy", "web", "--replicas=1", "-n", namespace)
    wait_for(
        lambda: len(kube.get_json("pods", "-n", namespace, "-l", "app=web")["items"]) == 1,
        60,
        "scale-down to one pod",
    )
    kept = ready_ips()
    for ip in ips - kept:  # the removed pods' servers are really gone
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{ip}:8080/", timeout=2)
