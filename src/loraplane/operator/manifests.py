"""BaseModelDeployment -> the objects that serve it: Deployment, Service, PodDisruptionBudget, Secret.

Pure functions of the resource and the operator's config; the operator applies what they return
with server-side apply, so rendering the same input twice gives the same objects.
"""

from __future__ import annotations

import secrets
from typing import Any

from loraplane.api import API_VERSION, BASE_MODEL_DEPLOYMENT, BaseModelDeployment
from loraplane.api.wire import (
    ADMIN_TOKEN_ENV,
    ADMIN_TOKEN_KEY,
    HEALTH_PATH,
    METRICS_PATH,
    READINESS_GATE,
    READY_PATH,
    RUNTIME_DTYPE,
)

from . import names
from .config import OperatorConfig

# The runtime drains in-flight requests for runtime_shutdown_seconds after SIGTERM; the pod
# gets this much more before SIGKILL, so a drain that ends on time is never cut.
GRACE_MARGIN_SECONDS = 15
# Loading a large model from a remote source can take many minutes; liveness only starts once
# /healthz has answered, and the startup probe allows this long for that.
STARTUP_SECONDS = 1800
STARTUP_PERIOD = 5
# The images' non-root user (images/*.Dockerfile).
RUNTIME_UID = 65532
# Where the runtime finds pvc://claim/path: PVC_ROOT/claim/path (its --pvc-root default).
PVC_ROOT = "/mnt/pvc"


def owner_reference(bmd: BaseModelDeployment) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": BASE_MODEL_DEPLOYMENT.kind,
        "name": bmd.metadata.name,
        "uid": bmd.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(bmd: BaseModelDeployment, name: str) -> dict[str, Any]:
    base = _name(bmd)
    return {
        "name": name,
        "namespace": bmd.metadata.namespace,
        "labels": names.child_labels(base),
        "ownerReferences": [owner_reference(bmd)],
    }


def _name(bmd: BaseModelDeployment) -> str:
    if not bmd.metadata.name:
        raise ValueError("a BaseModelDeployment without metadata.name cannot be rendered")
    return bmd.metadata.name


def new_admin_token() -> str:
    return secrets.token_urlsafe(32)


def admin_secret(bmd: BaseModelDeployment, token: str) -> dict[str, Any]:
    """The Secret with the runtime pods' admin token: only the operator and the pods read it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(bmd, names.admin_secret(_name(bmd))),
        "type": "Opaque",
        "stringData": {ADMIN_TOKEN_KEY: token},
    }


def runtime_args(bmd: BaseModelDeployment, config: OperatorConfig) -> list[str]:
    """The runtime's command line: every sizing knob of the spec, one flag each."""
    spec = bmd.spec
    model = spec.model.source
    if spec.model.revision:
        model = f"{model}@{spec.model.revision}"
    gpus = spec.runtime.resources.gpus
    limits = ["--max-model-len", str(spec.max_model_len)] if spec.max_model_len else []
    return [
        *config.runtime_command,
        "--model",
        model,
        "--served-model-name",
        _name(bmd),
        "--base-model-alias",
        spec.model.source,
        "--device",
        "cuda" if gpus > 0 else "cpu",
        "--dtype",
        # Without a GPU the runtime computes in float32: CPUs have no fast bfloat16 matmul.
        RUNTIME_DTYPE[spec.model.dtype] if gpus > 0 else "float32",
        "--host",
        "$(POD_IP)",
        "--port",
        str(spec.runtime.port),
        "--max-adapters",
        str(spec.max_adapters),
        "--max-cpu-adapters",
        str(spec.max_cpu_adapters),
        "--max-lora-rank",
        str(spec.max_lora_rank),
        "--max-num-batched-tokens",
        str(spec.max_batch_tokens),
        "--max-running",
        str(spec.max_running_sequences),
        "--gpu-memory-utilization",
        f"{spec.gpu_memory_utilization_percent / 100:g}",
        *limits,
        # Each pod its own cache: on a shared host (or a shared volume) two pods must never
        # write the same download directory.
        "--cache-dir",
        f"{config.cache_root}/$(POD_NAME)",
        "--shutdown-timeout",
        str(config.runtime_shutdown_seconds),
    ]


def _env(bmd: BaseModelDeployment) -> list[dict[str, Any]]:
    base = _name(bmd)
    own = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {
            "name": ADMIN_TOKEN_ENV,
            "valueFrom": {
                "secretKeyRef": {"name": names.admin_secret(base), "key": ADMIN_TOKEN_KEY}
            },
        },
    ]
    reserved = {e["name"] for e in own}
    # The user's variables come after ours so $(POD_IP) works in them; ours cannot be overridden.
    user = [e.to_dict() for e in bmd.spec.runtime.env or () if e.name not in reserved]
    return own + user


def _resources(bmd: BaseModelDeployment) -> dict[str, Any]:
    res = bmd.spec.runtime.resources
    requests = res.requests.to_dict() if res.requests else {}
    limits = res.limits.to_dict() if res.limits else {}
    if res.gpus > 0:  # extended resources: the limit is the request
        limits[res.gpu_resource_name] = str(res.gpus)
    out = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _probe(path: str, port: int, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 2,
    }


def _container(bmd: BaseModelDeployment, config: OperatorConfig) -> dict[str, Any]:
    spec = bmd.spec
    port = spec.runtime.port
    container: dict[str, Any] = {
        "name": names.RUNTIME_CONTAINER,
        "image": spec.runtime.image or config.runtime_image,
        "command": runtime_args(bmd, config),
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "env": _env(bmd),
        "resources": _resources(bmd),
        "readinessProbe": _probe(READY_PATH, port, period=2, failures=1),
        "livenessProbe": _probe(HEALTH_PATH, port, period=10, failures=3),
        "startupProbe": _probe(
            HEALTH_PATH, port, period=STARTUP_PERIOD, failures=STARTUP_SECONDS // STARTUP_PERIOD
        ),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        },
        "volumeMounts": [m for m, _ in _volumes(bmd, config)],
    }
    if spec.runtime.image_pull_policy:
        container["imagePullPolicy"] = str(spec.runtime.image_pull_policy)
    return container


def _volumes(
    bmd: BaseModelDeployment, config: OperatorConfig
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(mount, volume) pairs: the root filesystem is read-only, so downloads go to an emptyDir,
    scratch to /tmp, and a pvc:// base model is read from its claim."""
    out: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"name": "cache", "mountPath": config.cache_root}, {"name": "cache", "emptyDir": {}}),
        ({"name": "tmp", "mountPath": "/tmp"}, {"name": "tmp", "emptyDir": {}}),
    ]
    source = bmd.spec.model.source
    if source.startswith("pvc://"):
        claim = source.removeprefix("pvc://").split("/", 1)[0]
        out.append(
            (
                {"name": "model", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True},
                {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},
            )
        )
    return out


def _pod_spec(bmd: BaseModelDeployment, config: OperatorConfig) -> dict[str, Any]:
    spec = bmd.spec
    pod: dict[str, Any] = {
        "containers": [_container(bmd, config)],
        "readinessGates": [{"conditionType": READINESS_GATE}],
        "terminationGracePeriodSeconds": config.runtime_shutdown_seconds + GRACE_MARGIN_SECONDS,
        # The runtime's admin API, not the Kubernetes API: no token to mount.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "fsGroup": RUNTIME_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": [v for _, v in _volumes(bmd, config)],
    }
    if spec.runtime.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in spec.runtime.image_pull_secrets]
    sched = spec.scheduling
    if sched is not None:
        if sched.node_selector:
            pod["nodeSelector"] = dict(sched.node_selector)
        if sched.tolerations:
            pod["tolerations"] = [t.to_dict() for t in sched.tolerations]
        if sched.affinity:
            pod["affinity"] = sched.affinity.to_dict()
        if sched.priority_class_name:
            pod["priorityClassName"] = sched.priority_class_name
    return pod


def deployment(bmd: BaseModelDeployment, config: OperatorConfig, replicas: int) -> dict[str, Any]:
    """The runtime pods. A spec change rolls out by surging: old pods serve until new ones
    are Ready, and a new pod is Ready only once it holds every adapter (readiness gate)."""
    base = _name(bmd)
    port = bmd.spec.runtime.port
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(bmd, names.runtime_deployment(base)),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": names.selector_labels(base)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": names.child_labels(base),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(port),
                        "prometheus.io/path": METRICS_PATH,
                    },
                },
                "spec": _pod_spec(bmd, config),
            },
        },
    }


def service(bmd: BaseModelDeployment) -> dict[str, Any]:
    base = _name(bmd)
    port = bmd.spec.runtime.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(bmd, names.runtime_service(base)),
        "spec": {
            "type": "ClusterIP",
            "selector": names.selector_labels(base),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def disruption_budget(bmd: BaseModelDeployment) -> dict[str, Any]:
    """Voluntary evictions (node drains) take one serving pod at a time."""
    base = _name(bmd)
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(bmd, names.disruption_budget(base)),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": names.selector_labels(base)},
        },
    }


def endpoint(bmd: BaseModelDeployment) -> str:
    """The URL clients use inside the cluster: the base's router (docs/router.md)."""
    from . import routing  # routing renders with owner_reference from here

    return routing.endpoint(bmd)


def children(
    bmd: BaseModelDeployment, config: OperatorConfig, replicas: int
) -> list[dict[str, Any]]:
    """Everything applied for a BaseModelDeployment, in the order it is applied."""
    from . import routing  # routing renders with owner_reference from here

    return [
        deployment(bmd, config, replicas),
        service(bmd),
        disruption_budget(bmd),
        *routing.children(bmd, config),
    ]
