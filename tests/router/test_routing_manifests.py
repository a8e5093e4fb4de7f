"""The operator's rendering of a base's router: five objects, least privilege, its endpoint."""

from __future__ import annotations

import kubernetes_validate
import pytest

from loraplane.api import BaseModelDeployment
from loraplane.api.wire import (
    ROUTER_BASE_ENV,
    ROUTER_HOST_ENV,
    ROUTER_METRICS_PORT,
    ROUTER_POD_SELECTOR_ENV,
    ROUTER_PORT_ENV,
    api_keys_secret,
)
from loraplane.operator import names, routing
from loraplane.operator.config import OperatorConfig
from loraplane.router.config import RouterConfig

CONFIG = OperatorConfig(runtime_image="example/runtime:1")


def bmd(**spec) -> BaseModelDeployment:
    return BaseModelDeployment.model_validate(
        {
            "metadata": {"name": "mistral", "namespace": "team-a", "uid": "u-1", "generation": 3},
            "spec": {"model": {"source": "hf://org/mistral"}, **spec},
        }
    )


def test_five_objects_named_after_the_base_owned_by_it_and_deterministic() -> None:
    objs = routing.children(bmd(), CONFIG)
    assert objs == routing.children(bmd(), CONFIG)
    kinds = [o["kind"] for o in objs]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "Deployment", "Service"]
    for obj in objs:
        meta = obj["metadata"]
        assert meta["name"] == "mistral-router" and meta["namespace"] == "team-a"
        assert meta["ownerReferences"][0]["uid"] == "u-1"
        # Not the runtime's label: the operator's indexes select runtime children by it.
        assert names.LABEL_BASE not in meta["labels"]


@pytest.mark.parametrize("index", range(5))
def test_every_object_is_valid_kubernetes(index: int) -> None:
    obj = routing.children(bmd(), CONFIG)[index]
    kubernetes_validate.validate(obj, "1.34", strict=True)


def test_the_role_reads_only_what_the_router_watches() -> None:
    rules = routing.role(bmd())["rules"]
    for rule in rules:
        assert set(rule["verbs"]) == {"get", "list", "watch"}, rule
    by_resource = {r["resources"][0]: r for r in rules}
    assert set(by_resource) == {"pods", "loraadapters", "basemodeldeployments", "secrets"}
    assert by_resource["basemodeldeployments"]["resourceNames"] == ["mistral"]
    # Only the API-key Secret: never the runtime's admin token.
    assert by_resource["secrets"]["resourceNames"] == [api_keys_secret("mistral")]
    binding = routing.role_binding(bmd())
    assert binding["roleRef"]["name"] == "mistral-router"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "mistral-router", "namespace": "team-a"}
    ]


def test_the_router_pods_environment_is_a_valid_router_config() -> None:
    deploy = routing.deployment(bmd(runtime={"port": 9000}), CONFIG)
    pod = deploy["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "mistral-router"
    container = pod["containers"][0]
    assert container["command"] == ["loraplane-router"]
    assert container["image"] == "example/runtime:1"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[ROUTER_BASE_ENV] == "mistral" and env[ROUTER_PORT_ENV] == "9000"
    assert env[ROUTER_POD_SELECTOR_ENV] == names.selector_string("mistral")
    assert env[ROUTER_HOST_ENV] == "$(POD_IP)"
    resolved = {
        k: ("team-a" if v is None else v.replace("$(POD_IP)", "10.0.0.9")) for k, v in env.items()
    }
    config = RouterConfig.from_env(resolved)
    assert (config.namespace, config.port, config.host) == ("team-a", 9000, "10.0.0.9")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 9000, "metrics": ROUTER_METRICS_PORT}
    assert deploy["spec"]["selector"]["matchLabels"] == routing.selector_labels("mistral")
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_the_service_is_the_endpoint_and_exposes_no_metrics() -> None:
    b = bmd(runtime={"port": 9000})
    svc = routing.service(b)
    assert svc["spec"]["selector"] == routing.selector_labels("mistral")
    assert [p["port"] for p in svc["spec"]["ports"]] == [9000]
    assert routing.endpoint(b) == "http://mistral-router.team-a.svc:9000"
    runtime_pods = names.selector_labels("mistral")
    assert not set(runtime_pods.items()) <= set(svc["spec"]["selector"].items())
