"""Status patches and Events of one base's adapters: written only when something changed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from loraplane.api import LORA_ADAPTER, LoraAdapterStatus

from .kube import Kube


class StatusWriter:
    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube, self.namespace = kube, namespace
        self.written: dict[str, dict[str, Any]] = {}  # adapter name -> status last written

    def forget(self, name: str) -> None:
        self.written.pop(name, None)

    async def write_adapter(
        self, body: Mapping[str, Any], previous: LoraAdapterStatus | None, status: LoraAdapterStatus
    ) -> None:
        name = body["metadata"]["name"]
        new = status.to_dict()
        old = self.written.get(name) or (previous.to_dict() if previous else None)
        if new == old:
            return
        await self.kube.patch_status(LORA_ADAPTER.plural, self.namespace, name, new)
        self.written[name] = new
        await self._events(body, previous, status)

    async def _events(
        self, body: Mapping[str, Any], previous: LoraAdapterStatus | None, status: LoraAdapterStatus
    ) -> None:
        """One Event per change an owner cares about: loaded somewhere new, failed, ready."""
        obj = {**body, "apiVersion": body.get("apiVersion"), "kind": LORA_ADAPTER.kind}
        before = {r.pod: r for r in (previous.replicas or [])} if previous else {}
        newly_loaded = [
            r.pod
            for r in status.replicas or []
            if r.state == "Loaded" and (r.pod not in before or before[r.pod].state != "Loaded")
        ]
        newly_failed = [
            r
            for r in status.replicas or []
            if r.state == "Failed" and (r.pod not in before or before[r.pod].message != r.message)
        ]
        if newly_loaded:
            await self.kube.event(
                obj,
                "Normal",
                "Loaded",
                f"loaded on {_pods(newly_loaded)} ({status.loaded} replicas)",
            )
        for row in newly_failed[:3]:
            await self.kube.event(obj, "Warning", "LoadFailed", f"pod {row.pod}: {row.message}")
        unloaded = [
            p
            for p, r in before.items()
            if r.state == "Loaded" and p not in {x.pod for x in status.replicas or []}
        ]
        if unloaded:
            await self.kube.event(obj, "Normal", "Unloaded", f"no longer held by {_pods(unloaded)}")


def _pods(pods: Sequence[str]) -> str:
    shown = ", ".join(sorted(pods)[:5])
    return shown + (f" and {len(pods) - 5} more" if len(pods) > 5 else "")
