"""A runtime pod as the operator reads it from the Pod API: address, readiness, gate, restarts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from loraplane.api.wire import READINESS_GATE

from . import names


@dataclass(frozen=True)
class RuntimePod:
    name: str
    uid: str
    ip: str | None
    resource_version: str
    terminating: bool
    containers_ready: bool
    container_started: datetime | None  # when the runtime container last started
    restarts: int
    gate: bool | None  # the readiness gate: None until the operator first sets it
    gate_since: datetime | None

    @classmethod
    def of(cls, pod: Mapping[str, Any]) -> RuntimePod:
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or ()}
        runtime: Mapping[str, Any] = next(
            (
                c
                for c in status.get("containerStatuses") or ()
                if c.get("name") == names.RUNTIME_CONTAINER
            ),
            {},
        )
        started = ((runtime.get("state") or {}).get("running") or {}).get("startedAt")
        gate = conditions.get(READINESS_GATE)
        return cls(
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            ip=status.get("podIP") or None,
            resource_version=meta.get("resourceVersion", ""),
            terminating=meta.get("deletionTimestamp") is not None,
            containers_ready=(conditions.get("ContainersReady") or {}).get("status") == "True",
            container_started=_time(started),
            restarts=int(runtime.get("restartCount") or 0),
            gate=None if gate is None else gate.get("status") == "True",
            gate_since=_time(gate.get("lastTransitionTime")) if gate else None,
        )

    @property
    def serving_capable(self) -> bool:
        """Its runtime answers (the model is loaded): adapters can be synced into it."""
        return bool(self.ip) and self.containers_ready and not self.terminating

    @property
    def incarnation(self) -> tuple[str, int, datetime | None]:
        """Changes whenever the runtime process restarts, which empties it."""
        return (self.uid, self.restarts, self.container_started)


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def gate_condition(open_: bool, reason: str, message: str, now: datetime) -> dict[str, Any]:
    return {
        "type": READINESS_GATE,
        "status": "True" if open_ else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
