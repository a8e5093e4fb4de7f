"""An operator pod works as in a real cluster: a kopf process run by the node agent, with its
ServiceAccount token (TokenRequest) and only the chart's ClusterRole for the operator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e.cluster.testing import Kube, wait_for

HANDLERS = Path(__file__).with_name("kopf_marker.py")


def test_kopf_in_a_pod_handles_loraadapters(
    kube: Kube, crds: list[str], namespace: str, operator_role: str
) -> None:
    if kube.local is None:
        pytest.skip("needs the node agent to run the operator's process")
    kube.kubectl("create", "serviceaccount", "operator", "-n", namespace)
    binding = f"{namespace}-operator"
    kube.kubectl(
        "create",
        "clusterrolebinding",
        binding,
        f"--clusterrole={operator_role}",
        f"--serviceaccount={namespace}:operator",
    )
    try:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "operator"},
            "spec": {
                "serviceAccountName": "operator",
                "nodeSelector": {"loraplane.io/node-agent": "true"},
                "terminationGracePeriodSeconds": 5,
                "containers": [
                    {
                        "name": "kopf",
                        "image": "ignored",
                        "command": [
                            "kopf",
                            "run",
                            "--standalone",
                            f"--namespace={namespace}",
                            str(HANDLERS),
                        ],
                    }
                ],
            },
        }
        kube.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(pod))
        adapter = {
            "apiVersion": "loraplane.io/v1alpha1",
            "kind": "LoraAdapter",
            "metadata": {"name": "sql"},
            "spec": {"baseModel": "tiny", "source": "file:///adapters/sql"},
        }
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(adapter))

        def marked() -> bool:
            meta = kube.get_json("lora", "sql", "-n", namespace)["metadata"]
            return (meta.get("annotations") or {}).get("loraplane.io/seen-by") == "kopf-in-a-pod"

        wait_for(marked, 60, "the kopf pod to annotate loraadapter/sql")
        logs = kube.kubectl("logs", "operator", "-n", namespace).stdout
        assert "Forbidden" not in logs and "401" not in logs, logs
    finally:
        kube.kubectl("delete", "pod", "operator", "-n", namespace, "--wait=true", check=False)
        kube.kubectl("delete", "clusterrolebinding", binding, check=False)
