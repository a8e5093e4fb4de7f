"""The chart's optional NetworkPolicies and Prometheus monitors select the pods the operator
really renders (manifests.py, routing.py), by labels and port names that exist there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from e2e.cluster import chart
from e2e.cluster.paths import versions

from loraplane.api import BaseModelDeployment
from loraplane.operator import manifests, names, routing
from loraplane.operator.config import OperatorConfig

K8S = versions()["K8S_VERSION"].lstrip("v")
KIND_EXAMPLE = chart.REPO / "e2e" / "kind" / "tiny.yaml"
OPTIONAL = {"NetworkPolicy", "PodMonitor", "ServiceMonitor", "ConfigMap", "Service"}
EVERYTHING_ON = [
    "--set=monitoring.dashboard.enabled=true",
    "--set=monitoring.podMonitor.enabled=true",
    "--set=monitoring.serviceMonitor.enabled=true",
    "--set=networkPolicy.enabled=true",
    "--set=networkPolicy.namespaces={team-a,team-b}",
    "--set=networkPolicy.clients[0].podSelector.matchLabels.app=web",
    "--set=networkPolicy.directClients[0].namespaceSelector.matchLabels.batch=yes",
    "--set=networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring",
]


def render(helm_bin: Path, *values: str) -> list[dict]:
    text = chart.render(helm_bin, "lp", "--namespace=lp-system", *values)
    return [d for d in yaml.safe_load_all(text) if d]


def of_kind(docs: list[dict], kind: str) -> dict[tuple[str, str], dict]:
    return {
        (d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs if d["kind"] == kind
    }


@pytest.fixture(scope="module")
def fleet() -> dict[str, dict[str, Any]]:
    """The pod templates and Services the operator renders for the kind example's base."""
    body = next(
        d
        for d in yaml.safe_load_all(KIND_EXAMPLE.read_text())
        if d["kind"] == "BaseModelDeployment"
    )
    body["metadata"].update(namespace="team-a", uid="u-1", generation=1)
    bmd = BaseModelDeployment.model_validate(body)
    config = OperatorConfig()
    return {
        "runtime": manifests.deployment(bmd, config, 1)["spec"]["template"],
        "router": routing.deployment(bmd, config)["spec"]["template"],
        "runtime-service": manifests.service(bmd),
    }


def matches(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the chart uses matchLabels only
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def ports(pod_template: dict) -> set[str]:
    return {p["name"] for c in pod_template["spec"]["containers"] for p in c.get("ports", [])}


def meta_label(key: str) -> str:
    """Prometheus' name for a Kubernetes label in service discovery."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def test_nothing_optional_by_default(helm_bin: Path) -> None:
    kinds = {d["kind"] for d in render(helm_bin)}
    assert not kinds & OPTIONAL, kinds


def test_lint_strict_with_everything_on(helm_bin: Path) -> None:
    argv = [str(helm_bin), "lint", "--strict", f"--kube-version={K8S}", str(chart.CHART)]
    out = subprocess.run(
        [*argv, *EVERYTHING_ON], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_network_policies_admit_exactly_the_operator_routers_and_chosen_clients(
    helm_bin: Path, fleet: dict[str, dict[str, Any]]
) -> None:
    docs = render(helm_bin, *EVERYTHING_ON)
    policies = of_kind(docs, "NetworkPolicy")
    for policy in policies.values():
        kubernetes_validate.validate(policy, K8S, strict=True)
    assert set(policies) == {
        ("lp-system", "lp-loraplane"),
        *((ns, f"lp-loraplane-{c}") for ns in ("team-a", "team-b") for c in ("runtime", "router")),
    }
    operator_pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]
    runtime_pod, router_pod = fleet["runtime"], fleet["router"]

    def is_operator(peer: dict) -> bool:
        return peer.get("namespaceSelector") == {
            "matchLabels": {"kubernetes.io/metadata.name": "lp-system"}
        } and matches(peer["podSelector"], operator_pod["metadata"]["labels"])

    def is_router(peer: dict) -> bool:
        return set(peer) == {"podSelector"} and matches(
            peer["podSelector"], router_pod["metadata"]["labels"]
        )

    runtime = policies[("team-a", "lp-loraplane-runtime")]["spec"]
    assert matches(runtime["podSelector"], runtime_pod["metadata"]["labels"])
    assert not matches(runtime["podSelector"], router_pod["metadata"]["labels"])
    (rule,) = runtime["ingress"]
    peers = rule["from"]
    assert "ports" not in rule  # the runtime's one port: serving, admin API and metrics
    assert sum(map(is_operator, peers)) == 1 and sum(map(is_router, peers)) == 1
    assert {"namespaceSelector": {"matchLabels": {"batch": "yes"}}} in peers
    assert {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}} in peers
    assert len(peers) == 4

    router = policies[("team-a", "lp-loraplane-router")]["spec"]
    assert matches(router["podSelector"], router_pod["metadata"]["labels"])
    assert not matches(router["podSelector"], runtime_pod["metadata"]["labels"])
    clients, scrapers = router["ingress"]
    assert clients == {"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}
    assert is_operator(scrapers["from"][0])  # the operator reads held demand from it
    assert [p["port"] for p in scrapers["ports"]] == ["metrics"]
    assert "metrics" in ports(router_pod)

    operator = policies[("lp-system", "lp-loraplane")]["spec"]
    assert matches(operator["podSelector"], operator_pod["metadata"]["labels"])
    (scrape,) = operator["ingress"]
    assert [p["port"] for p in scrape["ports"]] == ["metrics"]
    assert "metrics" in ports(operator_pod)


def test_network_policy_defaults_close_the_operator_and_leave_routers_open(
    helm_bin: Path,
) -> None:
    docs = render(helm_bin, "--set=networkPolicy.enabled=true", "--set=watchNamespaces={team-a}")
    policies = of_kind(docs, "NetworkPolicy")
    assert set(policies) == {("lp-system", "lp-loraplane"), ("team-a", "lp-loraplane-runtime")}
    assert policies[("lp-system", "lp-loraplane")]["spec"]["ingress"] == []


def test_network_policy_needs_namespaces(helm_bin: Path) -> None:
    argv = [str(helm_bin), "template", "lp", str(chart.CHART), f"--kube-version={K8S}"]
    out = subprocess.run(
        [*argv, "--set=networkPolicy.enabled=true"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "list the namespaces of your BaseModelDeployments in networkPolicy.namespaces" in (
        out.stderr
    )


def test_monitors_select_the_pods_and_ports_that_serve_metrics(
    helm_bin: Path, fleet: dict[str, dict[str, Any]]
) -> None:
    docs = render(helm_bin, *EVERYTHING_ON, "--set=monitoring.namespaces={team-a}")
    operator_pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]
    pods = {"operator": operator_pod, "runtime": fleet["runtime"], "router": fleet["router"]}
    pod_monitors = of_kind(docs, "PodMonitor")
    assert set(pod_monitors) == {("lp-system", f"lp-loraplane-{c}") for c in pods}
    for component, pod in pods.items():
        spec = pod_monitors[("lp-system", f"lp-loraplane-{component}")]["spec"]
        for other, other_pod in pods.items():  # each selects its own pods and no others
            assert matches(spec["selector"], other_pod["metadata"]["labels"]) == (
                other == component
            ), (component, other)
        (endpoint,) = spec["podMetricsEndpoints"]
        assert endpoint["port"] in ports(pod) and endpoint["path"] == "/metrics"
        expected_ns = ["lp-system"] if component == "operator" else ["team-a"]
        assert spec["namespaceSelector"] == {"matchNames": expected_ns}
        if component == "operator":
            assert endpoint["honorLabels"] is True  # its namespace and base labels win
        else:  # base_model from the pod's own label naming its BaseModelDeployment
            (relabel,) = endpoint["relabelings"]
            key = names.LABEL_BASE if component == "runtime" else routing.LABEL_ROUTER_FOR
            assert relabel["sourceLabels"] == [f"__meta_kubernetes_pod_label_{meta_label(key)}"]
            assert relabel["targetLabel"] == "base_model"
            assert pod["metadata"]["labels"][key] == "tiny"

    services = of_kind(docs, "Service")
    service_monitors = of_kind(docs, "ServiceMonitor")
    assert set(service_monitors) == {
        ("lp-system", "lp-loraplane-operator"),
        ("lp-system", "lp-loraplane-runtime"),
    }
    operator_svc = services[("lp-system", "lp-loraplane-metrics")]
    kubernetes_validate.validate(operator_svc, K8S, strict=True)
    assert matches(
        {"matchLabels": operator_svc["spec"]["selector"]}, operator_pod["metadata"]["labels"]
    )
    for component, svc in (("operator", operator_svc), ("runtime", fleet["runtime-service"])):
        spec = service_monitors[("lp-system", f"lp-loraplane-{component}")]["spec"]
        assert matches(spec["selector"], svc["metadata"]["labels"]), component
        (endpoint,) = spec["endpoints"]
        assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    relabel = service_monitors[("lp-system", "lp-loraplane-runtime")]["spec"]["endpoints"][0]
    assert relabel["relabelings"][0]["sourceLabels"] == [
        f"__meta_kubernetes_service_label_{meta_label(names.LABEL_BASE)}"
    ]
    assert fleet["runtime-service"]["metadata"]["labels"][names.LABEL_BASE] == "tiny"
