"""Which pods the simulated runtime serves, and what each one's command line says."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from loraplane.api.wire import ADMIN_TOKEN_ENV

from .runtime import PodIdentity

KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
RESTART_ANNOTATION = "simruntime.loraplane.io/restart"
"""Set or change it on a pod and its simulated runtime restarts: it comes back empty, its
connections drop, and the container's restartCount and containerID change as a kubelet's do."""
DEFAULT_MAX_ADAPTERS = 8  # the runtime's --max-adapters default


def is_kwok_node(node: dict[str, Any]) -> bool:
    key, value = KWOK_NODE_ANNOTATION
    return (node["metadata"].get("annotations") or {}).get(key) == value


def runtime_container(pod: dict[str, Any], command: str) -> dict[str, Any] | None:
    """The pod's container whose command starts with the runtime's (by basename)."""
    for c in pod["spec"].get("containers") or []:
        argv = c.get("command") or []
        if argv and argv[0].rsplit("/", 1)[-1] == command:
            return c
    return None


def argv_of(container: dict[str, Any]) -> list[str]:
    return [*(container.get("command") or []), *(container.get("args") or [])]


def flag(argv: list[str], name: str) -> str | None:
    """The value of --name V or --name=V (the last one wins, as argparse does)."""
    value = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def port_of(container: dict[str, Any], default: int) -> int:
    port = flag(argv_of(container), "--port")
    if port is not None:
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == "http":
            return int(p["containerPort"])
    return default


def identity(pod: dict[str, Any], container: dict[str, Any]) -> PodIdentity:
    argv = argv_of(container)
    model = flag(argv, "--model") or "unknown"
    base = flag(argv, "--served-model-name") or model.rstrip("/").rsplit("/", 1)[-1]
    return PodIdentity(
        namespace=pod["metadata"]["namespace"],
        name=pod["metadata"]["name"],
        base_name=base,
        model=model,
        max_adapters=int(flag(argv, "--max-adapters") or DEFAULT_MAX_ADAPTERS),
    )


@dataclass(frozen=True)
class TokenRef:
    """Where the container's admin token comes from: a literal value or a Secret's key."""

    value: str | None = None
    secret: str | None = None
    key: str | None = None


def token_ref(container: dict[str, Any]) -> TokenRef | None:
    """None: the container has no admin token, and its admin routes are open."""
    for env in container.get("env") or []:
        if env.get("name") != ADMIN_TOKEN_ENV:
            continue
        if "value" in env:
            return TokenRef(value=env["value"])
        ref = (env.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            return TokenRef(secret=ref["name"], key=ref["key"])
    return None


def secret_value(secret: dict[str, Any], key: str) -> str | None:
    data = secret.get("data") or {}
    return base64.b64decode(data[key]).decode() if key in data else None


def serving_address(pod: dict[str, Any], kwok_nodes: set[str]) -> str | None:
    """The pod IP to serve on, or None while the pod should not be answered: not on a kwok
    node, not Running yet, or being deleted (a runtime stops on SIGTERM)."""
    if pod["metadata"].get("deletionTimestamp"):
        return None
    if pod["spec"].get("nodeName") not in kwok_nodes:
        return None
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return None
    return status.get("podIP") or None


def restarted_status(pod: dict[str, Any], container: str, now: str) -> list[dict[str, Any]]:
    """containerStatuses after `container` restarted: one more restart, a new containerID."""
    out = []
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == container:
            started = ((cs.get("state") or {}).get("running") or {}).get("startedAt", now)
            n = int(cs.get("restartCount") or 0) + 1
            uid = pod["metadata"]["uid"]
            cs = {
                **cs,
                "restartCount": n,
                "containerID": f"kwok://{uid}-{container}-{n}",
                "lastState": {
                    "terminated": {
                        "exitCode": 137,
                        "reason": "Error",
                        "startedAt": started,
                        "finishedAt": now,
                    }
                },
                "state": {"running": {"startedAt": now}},
                "ready": True,
                "started": True,
            }
        out.append(cs)
    return out
