"""The operator's local user gets what the operator needs and nothing more."""

from __future__ import annotations

import pytest
from e2e.cluster.testing import Kube

ALLOWED = [
    ("list", "basemodeldeployments.loraplane.io"),
    ("patch", "loraadapters.loraplane.io", "--subresource=status"),
    ("update", "loraadapters.loraplane.io", "--subresource=finalizers"),
    ("create", "deployments.apps"),
    ("patch", "services"),
    ("watch", "pods"),
    ("list", "endpointslices.discovery.k8s.io"),
    ("create", "events"),
    ("update", "leases.coordination.k8s.io"),
    ("create", "poddisruptionbudgets.policy"),
]
DENIED = [
    ("get", "secrets"),
    ("create", "pods"),
    ("delete", "namespaces"),
    ("create", "basemodeldeployments.loraplane.io"),  # the operator never writes a user's spec
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
]


@pytest.fixture
def operator_kubeconfig(kube: Kube):
    if kube.local is None:
        pytest.skip("the operator user exists in the local control plane")
    return kube.local.kubeconfig("operator")


@pytest.mark.parametrize("check", ALLOWED, ids=lambda c: " ".join(c))
def test_operator_may(kube: Kube, operator_kubeconfig, check) -> None:
    out = kube.kubectl("auth", "can-i", *check, "-A", kubeconfig=operator_kubeconfig, check=False)
    assert out.stdout.strip() == "yes", (check, out.stdout, out.stderr)


@pytest.mark.parametrize("check", DENIED, ids=lambda c: " ".join(c))
def test_operator_may_not(kube: Kube, operator_kubeconfig, check) -> None:
    out = kube.kubectl("auth", "can-i", *check, "-A", kubeconfig=operator_kubeconfig, check=False)
    assert out.stdout.strip() == "no", (check, out.stdout, out.stderr)


def test_operator_identity(kube: Kube, operator_kubeconfig) -> None:
    out = kube.kubectl(
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
        kubeconfig=operator_kubeconfig,
    )
    assert out.stdout == "loraplane-operator"
