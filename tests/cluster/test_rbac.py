"""The operator gets what it needs and nothing more: the chart's RBAC, rendered in every mode,
grants exactly the rights listed here, and the local user bound to it may do just that."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from e2e.cluster import chart
from e2e.cluster.testing import Kube

ALL = frozenset({"get", "list", "watch", "create", "update", "patch", "delete"})
READ = frozenset({"get", "list", "watch"})
APPLY = frozenset({"get", "create", "update", "patch"})

# What the operator does, resource by resource (issue 8). A change to the chart's rules that
# is not a change here fails, and so does a right the operator gains without the chart.
IN_NAMESPACES = {
    # It reads users' resources and writes only their status and its finalizer, never a spec.
    ("loraplane.io", "basemodeldeployments"): READ | {"patch", "update"},
    ("loraplane.io", "loraadapters"): READ | {"patch", "update"},
    ("loraplane.io", "basemodeldeployments/status"): {"get", "patch", "update"},
    ("loraplane.io", "loraadapters/status"): {"get", "patch", "update"},
    ("loraplane.io", "basemodeldeployments/finalizers"): {"update"},
    ("loraplane.io", "loraadapters/finalizers"): {"update"},
    # The children of a BaseModelDeployment.
    ("apps", "deployments"): ALL,
    ("", "services"): ALL,
    ("policy", "poddisruptionbudgets"): ALL,
    # Each base's router: its identity and its read-only rights, applied by server-side apply.
    ("", "serviceaccounts"): APPLY,
    ("rbac.authorization.k8s.io", "roles"): APPLY,
    ("rbac.authorization.k8s.io", "rolebindings"): APPLY,
    # One admin-token Secret per deployment (garbage-collected by owner), LoraAdapters' secretRefs.
    ("", "secrets"): READ | {"create", "update", "patch"},
    ("", "pods"): READ,
    ("", "pods/status"): {"patch"},  # the readiness gate loraplane.io/adapters-loaded
    ("discovery.k8s.io", "endpointslices"): READ,
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
    ("coordination.k8s.io", "leases"): READ | {"create", "update", "patch"},
}
CLUSTER_WIDE = {  # what kopf reads cluster-wide even when it watches a few namespaces
    ("apiextensions.k8s.io", "customresourcedefinitions"): READ,
    ("", "namespaces"): READ,
}
PEERING = {"get", "list", "watch", "patch"}
CLUSTER_PEERING = {("kopf.dev", "clusterkopfpeerings"): PEERING}
NAMESPACED_PEERING = {("kopf.dev", "kopfpeerings"): PEERING}


def rights(rules: list[dict]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs; wildcards and name-scoped rules are refused outright."""
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for rule in rules:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource) and "*" not in rule["verbs"], rule
                out[(group, resource)] |= set(rule["verbs"])
    return dict(out)


RBAC_KINDS = {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def rendered_rbac(helm_bin: Path, *values: str) -> list[dict]:
    """Every RBAC object the chart renders, from whichever template."""
    text = chart.render(helm_bin, "lp", "--namespace=lp-system", *values)
    return [d for d in yaml.safe_load_all(text) if d and d["kind"] in RBAC_KINDS]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def binds_the_operator(binding: dict, role: dict) -> None:
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": role["kind"],
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "lp-loraplane", "namespace": "lp-system"}
    ]


@pytest.mark.parametrize("election", [True, False], ids=["leader-election", "standalone"])
def test_whole_cluster_gets_one_cluster_role(helm_bin: Path, election: bool) -> None:
    docs = rendered_rbac(helm_bin, f"--set=leaderElection.enabled={str(election).lower()}")
    (role,) = by_kind(docs, "ClusterRole")
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    want = {**IN_NAMESPACES, **CLUSTER_WIDE, **(CLUSTER_PEERING if election else {})}
    assert rights(role["rules"]) == want
    binds_the_operator(binding, role)


@pytest.mark.parametrize("election", [True, False], ids=["leader-election", "standalone"])
def test_watched_namespaces_get_a_role_each(helm_bin: Path, election: bool) -> None:
    docs = rendered_rbac(
        helm_bin,
        "--set=watchNamespaces={team-a,team-b}",
        f"--set=leaderElection.enabled={str(election).lower()}",
    )
    (cluster_role,) = by_kind(docs, "ClusterRole")
    assert rights(cluster_role["rules"]) == CLUSTER_WIDE
    binds_the_operator(by_kind(docs, "ClusterRoleBinding")[0], cluster_role)
    roles = {r["metadata"]["namespace"]: r for r in by_kind(docs, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(docs, "RoleBinding")}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    want = {**IN_NAMESPACES, **(NAMESPACED_PEERING if election else {})}
    for ns, role in roles.items():
        assert rights(role["rules"]) == want, ns
        binds_the_operator(bindings[ns], role)


def test_rbac_create_false_renders_none(helm_bin: Path) -> None:
    assert rendered_rbac(helm_bin, "--set=rbac.create=false") == []


# -- the local user loraplane-operator, bound by `cluster up` to the chart's ClusterRole ------
ALLOWED = [
    ("list", "basemodeldeployments.loraplane.io"),
    ("patch", "loraadapters.loraplane.io", "--subresource=status"),
    ("update", "loraadapters.loraplane.io", "--subresource=finalizers"),
    ("create", "deployments.apps"),
    ("patch", "services"),
    ("watch", "pods"),
    ("patch", "pods", "--subresource=status"),
    ("get", "secrets"),
    ("create", "secrets"),
    ("list", "endpointslices.discovery.k8s.io"),
    ("create", "events"),
    ("update", "leases.coordination.k8s.io"),
    ("create", "poddisruptionbudgets.policy"),
    ("patch", "roles.rbac.authorization.k8s.io"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("patch", "serviceaccounts"),
    ("patch", "clusterkopfpeerings.kopf.dev"),
]
DENIED = [
    ("delete", "secrets"),
    ("create", "pods"),
    ("patch", "pods"),  # only their status, for the readiness gate
    ("delete", "namespaces"),
    ("create", "basemodeldeployments.loraplane.io"),  # the operator never writes a user's spec
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("create", "clusterkopfpeerings.kopf.dev"),  # the chart makes the peering object
]


@pytest.fixture
def operator_kubeconfig(kube: Kube, operator_role: str) -> Path:
    assert kube.local is not None  # operator_role skips elsewhere
    # can-i on kopf's peering resources needs their CRDs, whichever test ran first.
    peering_crds = chart.CHART / "charts" / "kopf-peering" / "crds"
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(peering_crds))
    return kube.local.kubeconfig("operator")


def can_i(kube: Kube, kubeconfig: Path, check: tuple[str, ...]) -> str:
    out = kube.kubectl("auth", "can-i", *check, "-A", kubeconfig=kubeconfig, check=False)
    return out.stdout.strip() + out.stderr


@pytest.mark.parametrize("check", ALLOWED, ids=lambda c: " ".join(c))
def test_operator_may(kube: Kube, operator_kubeconfig: Path, check) -> None:
    assert can_i(kube, operator_kubeconfig, check).startswith("yes"), check


@pytest.mark.parametrize("check", DENIED, ids=lambda c: " ".join(c))
def test_operator_may_not(kube: Kube, operator_kubeconfig: Path, check) -> None:
    assert can_i(kube, operator_kubeconfig, check).startswith("no"), check


def test_operator_identity(kube: Kube, operator_kubeconfig: Path) -> None:
    out = kube.kubectl(
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
        kubeconfig=operator_kubeconfig,
    )
    assert out.stdout == "loraplane-operator"
