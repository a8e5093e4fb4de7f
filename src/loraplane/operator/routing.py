"""BaseModelDeployment -> its router: Deployment, Service, ServiceAccount, Role, RoleBinding.

One router per base (docs/router.md says why): `<base>-router` names all five objects, and its
Service is the deployment's endpoint. The router reads only its base's objects: the Role lets
it watch Pods and LoraAdapters in the namespace, its own BaseModelDeployment and its API-key
Secret, and nothing else; it never gets the runtime's admin token.

Router objects carry their own labels, not names.LABEL_BASE: the operator's indexes and child
watches select by that label and must keep seeing only the runtime's children.
"""

from __future__ import annotations

from typing import Any

from loraplane.api import BASE_MODEL_DEPLOYMENT, GROUP, LORA_ADAPTER, BaseModelDeployment
from loraplane.api.wire import (
    METRICS_PATH,
    READY_PATH,
    ROUTER_API_KEYS_SECRET_ENV,
    ROUTER_BASE_ENV,
    ROUTER_HOST_ENV,
    ROUTER_METRICS_PORT,
    ROUTER_METRICS_PORT_ENV,
    ROUTER_NAMESPACE_ENV,
    ROUTER_POD_SELECTOR_ENV,
    ROUTER_PORT_ENV,
    api_keys_secret,
)

from . import names
from .config import OperatorConfig
from .manifests import owner_reference

APP_NAME = "loraplane-router"
COMPONENT_ROUTER = "router"
CONTAINER = "router"
COMMAND = ("loraplane-router",)
LABEL_ROUTER_FOR = f"{GROUP}/router-for"
"""The BaseModelDeployment a router serves: the selector of its pods."""
# Two, so a router pod lost or rolled never takes the endpoint down; each holds requests and
# reports its own held demand, which the operator sums.
REPLICAS = 2
# A proxy's footprint: it holds no model. The memory limit bounds held requests' bodies
# (1024 x 4 MiB at worst, far more than is ever held at once).
RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}}
# Answers in progress get 30 s after SIGTERM (the router's own drain) and a margin.
GRACE_SECONDS = 45
HEALTH_PATH = "/healthz"


def name(base: str) -> str:
    """Every router object of a base is named this."""
    return f"{base}-router"


def selector_labels(base: str) -> dict[str, str]:
    return {LABEL_ROUTER_FOR: base, names.LABEL_COMPONENT: COMPONENT_ROUTER}


def labels(base: str) -> dict[str, str]:
    return {
        **selector_labels(base),
        names.LABEL_NAME: APP_NAME,
        names.LABEL_INSTANCE: base,
        names.LABEL_MANAGED_BY: names.MANAGED_BY,
    }


def endpoint(bmd: BaseModelDeployment) -> str:
    """The URL clients use inside the cluster: the router's Service."""
    return f"http://{name(_base(bmd))}.{bmd.metadata.namespace}.svc:{bmd.spec.runtime.port}"


def service_account(bmd: BaseModelDeployment) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(bmd)}


def role(bmd: BaseModelDeployment) -> dict[str, Any]:
    """Reads of its base's objects only: what its watches list and follow."""
    base = _base(bmd)
    read = ["get", "list", "watch"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(bmd),
        "rules": [
            # Pods and LoraAdapters cannot be narrowed by label or field in RBAC; the router
            # selects its base's among them.
            {"apiGroups": [""], "resources": ["pods"], "verbs": read},
            {"apiGroups": [GROUP], "resources": [LORA_ADAPTER.plural], "verbs": read},
            {
                "apiGroups": [GROUP],
                "resources": [BASE_MODEL_DEPLOYMENT.plural],
                "resourceNames": [base],
                "verbs": read,
            },
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                "resourceNames": [api_keys_secret(base)],
                "verbs": read,
            },
        ],
    }


def role_binding(bmd: BaseModelDeployment) -> dict[str, Any]:
    router = name(_base(bmd))
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(bmd),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": router},
        "subjects": [
            {"kind": "ServiceAccount", "name": router, "namespace": bmd.metadata.namespace}
        ],
    }


def _env(bmd: BaseModelDeployment) -> list[dict[str, Any]]:
    base = _base(bmd)

    def field(path: str) -> dict[str, Any]:
        return {"fieldRef": {"fieldPath": path}}

    return [
        {"name": "POD_IP", "valueFrom": field("status.podIP")},
        {"name": ROUTER_NAMESPACE_ENV, "valueFrom": field("metadata.namespace")},
        {"name": ROUTER_BASE_ENV, "value": base},
        {"name": ROUTER_POD_SELECTOR_ENV, "value": names.selector_string(base)},
        # The pod's own address, not 0.0.0.0: where pods share a host (the local cluster's
        # node agent) a wildcard would take every runtime pod's port.
        {"name": ROUTER_HOST_ENV, "value": "$(POD_IP)"},
        {"name": ROUTER_PORT_ENV, "value": str(bmd.spec.runtime.port)},
        {"name": ROUTER_METRICS_PORT_ENV, "value": str(ROUTER_METRICS_PORT)},
        {"name": ROUTER_API_KEYS_SECRET_ENV, "value": api_keys_secret(base)},
    ]


def _container(bmd: BaseModelDeployment, config: OperatorConfig) -> dict[str, Any]:
    runtime = bmd.spec.runtime

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": "http"},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 2,
        }

    container: dict[str, Any] = {
        "name": CONTAINER,
        # The runtime's image holds the whole loraplane package, the router included.
        "image": runtime.image or config.runtime_image,
        "command": list(COMMAND),
        "ports": [
            {"name": "http", "containerPort": runtime.port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": ROUTER_METRICS_PORT, "protocol": "TCP"},
        ],
        "env": _env(bmd),
        "resources": RESOURCES,
        "readinessProbe": probe(READY_PATH, period=2, failures=1),
        "livenessProbe": probe(HEALTH_PATH, period=10, failures=3),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if runtime.image_pull_policy:
        container["imagePullPolicy"] = str(runtime.image_pull_policy)
    return container


def deployment(bmd: BaseModelDeployment, config: OperatorConfig) -> dict[str, Any]:
    base = _base(bmd)
    pod: dict[str, Any] = {
        "serviceAccountName": name(base),
        "automountServiceAccountToken": True,  # it watches the API
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": GRACE_SECONDS,
        "containers": [_container(bmd, config)],
        # Routers on different nodes where there are several: one node lost keeps one.
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "labelSelector": {"matchLabels": selector_labels(base)},
                            "topologyKey": "kubernetes.io/hostname",
                        },
                    }
                ]
            }
        },
    }
    if bmd.spec.runtime.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in bmd.spec.runtime.image_pull_secrets]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(bmd),
        "spec": {
            "replicas": REPLICAS,
            "selector": {"matchLabels": selector_labels(base)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": labels(base),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(ROUTER_METRICS_PORT),
                        "prometheus.io/path": METRICS_PATH,
                    },
                },
                "spec": pod,
            },
        },
    }


def service(bmd: BaseModelDeployment) -> dict[str, Any]:
    """The endpoint: only the serving port; the metrics port is reachable by pod IP alone."""
    base = _base(bmd)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(bmd),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(base),
            "ports": [
                {
                    "name": "http",
                    "port": bmd.spec.runtime.port,
                    "targetPort": "http",
                    "protocol": "TCP",
                }
            ],
        },
    }


def children(bmd: BaseModelDeployment, config: OperatorConfig) -> list[dict[str, Any]]:
    """The router's objects in the order they are applied: identity and rights first."""
    return [
        service_account(bmd),
        role(bmd),
        role_binding(bmd),
        deployment(bmd, config),
        service(bmd),
    ]


def _metadata(bmd: BaseModelDeployment) -> dict[str, Any]:
    base = _base(bmd)
    return {
        "name": name(base),
        "namespace": bmd.metadata.namespace,
        "labels": labels(base),
        "ownerReferences": [owner_reference(bmd)],
    }


def _base(bmd: BaseModelDeployment) -> str:
    if not bmd.metadata.name:
        raise ValueError("a BaseModelDeployment without metadata.name cannot be rendered")
    return bmd.metadata.name
