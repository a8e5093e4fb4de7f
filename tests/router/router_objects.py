"""Pods, LoraAdapters and a BaseModelDeployment as the API returns them, for router tests."""

from __future__ import annotations

from typing import Any

BASE = "tiny"


def pod(
    name: str,
    ip: str = "10.0.0.1",
    *,
    ready: bool = True,
    deleting: bool = False,
    port: int = 8000,
    phase: str = "Running",
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "ns"}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-29T10:00:00Z"
    return {
        "metadata": meta,
        "spec": {
            "containers": [{"name": "runtime", "ports": [{"name": "http", "containerPort": port}]}]
        },
        "status": {
            "phase": phase,
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def adapter(
    name: str,
    loaded_on: tuple[str, ...] = (),
    *,
    served: str | None = None,
    base: str = BASE,
    ready: bool = True,
    loading_on: tuple[str, ...] = (),
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "ns",
        "creationTimestamp": "2026-11-29T09:00:00Z",
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-11-29T10:00:00Z"
    spec: dict[str, Any] = {
        "baseModel": base,
        "source": f"https://example.com/{name}?sig=secret",
    }
    if served:
        spec["servedName"] = served
    rows = [{"pod": p, "state": "Loaded", "loadedAt": "2026-11-29T09:01:00Z"} for p in loaded_on]
    rows += [{"pod": p, "state": "Loading"} for p in loading_on]
    status = {
        "replicas": rows,
        "conditions": [
            {
                "type": "Ready",
                "status": "True" if ready else "False",
                "reason": "Loaded" if ready else "Loading",
                "message": "",
                "lastTransitionTime": "2026-11-29T09:01:00Z",
            }
        ],
    }
    return {"metadata": meta, "spec": spec, "status": status}


def base_model(name: str = BASE, port: int = 8000) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "creationTimestamp": "2026-11-29T08:00:00Z"},
        "spec": {
            "model": {"source": "hf://org/tiny", "revision": "main"},
            "runtime": {"port": port},
        },
    }
