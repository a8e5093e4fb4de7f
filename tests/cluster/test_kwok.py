"""kwok for scale: fake GPU nodes whose pods become Running without processes."""

from __future__ import annotations

import json

from e2e.cluster.testing import KWOK_SET, KWOK_TOLERATION, Kube, is_ready, kwok_nodes, wait_for


def test_fifty_gpu_replicas_run_on_kwok_nodes(kube: Kube, namespace: str) -> None:
    if kube.local is None:
        # On another cluster kwok may not run; nodes nobody manages would never get Ready.
        import pytest

        pytest.skip("kwok runs with the local control plane")
    labels = {"app": "many"}
    deploy = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "many"},
        "spec": {
            "replicas": 50,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {KWOK_SET: namespace},
                    "tolerations": [KWOK_TOLERATION],
                    "containers": [
                        {
                            "name": "runtime",
                            "image": "loraplane/runtime:never-pulled",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}},
                        }
                    ],
                },
            },
        },
    }
    with kwok_nodes(kube, f"{namespace}-", count=7, gpus=8) as names:
        wait_for(
            lambda: all(is_ready(kube.get_json("node", n)) for n in names), 60, "kwok nodes Ready"
        )
        kube.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(deploy))
        status = wait_for(
            lambda: (
                (s := kube.get_json("deploy", "many", "-n", namespace).get("status", {})).get(
                    "readyReplicas"
                )
                == 50
                and s
            ),
            180,
            "50 ready replicas on kwok nodes",
        )
        assert status["replicas"] == 50
        pods = kube.get_json("pods", "-n", namespace, "-l", "app=many")["items"]
        assert {p["spec"]["nodeName"] for p in pods} <= set(names)
        assert all(p["status"]["phase"] == "Running" for p in pods)
        # 7 nodes x 8 GPUs: the scheduler spread them by GPU capacity, at most 8 a node.
        per_node = {}
        for p in pods:
            per_node[p["spec"]["nodeName"]] = per_node.get(p["spec"]["nodeName"], 0) + 1
        assert max(per_node.values()) <= 8, per_node
        kube.kubectl("delete", "deploy", "many", "-n", namespace, "--wait=false")
