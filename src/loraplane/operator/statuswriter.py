"""Each adapter's status from what its base's pods hold, patched (with Events) only when it changed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from loraplane.api import LORA_ADAPTER, LoraAdapterStatus

from . import adaptersync
from .adaptersync import DesiredAdapter, PodMemory
from .bodies import adapter_status_of, served_name_of
from .kube import Kube
from .pods import RuntimePod
from .status import PodAdapterFacts, Reason, adapter_status, blocked_adapter_status


class StatusWriter:
    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube, self.namespace = kube, namespace
        self.written: dict[str, dict[str, Any]] = {}  # adapter name -> status last written
        # adapter name -> (the inputs of its last written status, ready, failing)
        self.reported: dict[str, tuple[Any, bool, bool]] = {}

    def forget(self, name: str) -> None:
        self.written.pop(name, None)
        self.reported.pop(name, None)

    async def report_adapters(
        self,
        bodies: Sequence[Mapping[str, Any]],
        targets: Sequence[RuntimePod],
        desired: Mapping[str, DesiredAdapter],
        blocked: Mapping[str, tuple[Reason, str]],
        memory: Callable[[RuntimePod], PodMemory],
    ) -> tuple[int, list[str]]:
        """Write each adapter's status; returns how many are Ready and which fail.

        An adapter whose inputs (its spec, and the very answers and failures each pod gave for
        it) are those of its last written status is skipped without building anything: at a
        thousand adapters on hundreds of pods, rebuilding every status each pass is what costs.
        """
        ready, failing = 0, []
        by_name = {d.name: d for d in desired.values()}
        writes: list[
            tuple[Mapping[str, Any], LoraAdapterStatus | None, LoraAdapterStatus, Any]
        ] = []
        for body in bodies:
            meta = body["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            name = meta["name"]
            want = by_name.get(name)
            if want is None:
                previous = adapter_status_of(body)
                reason, message = blocked.get(name, (Reason.LOAD_FAILED, "not synced"))
                status = blocked_adapter_status(
                    meta.get("generation") or 0, served_name_of(body), reason, message, previous
                )
                failing.append(name)
                writes.append((body, previous, status, None))
                continue
            entries = [
                (
                    pod.name,
                    memory(pod).actual.get(want.served_name),
                    memory(pod).failures.get(want.served_name),
                )
                for pod in targets
            ]
            # The answers themselves, compared by identity: held here, so never recycled.
            key = (want, entries)
            known = self.reported.get(name)
            if known is not None and _same_inputs(known[0], key):
                ready += known[1]
                if known[2]:
                    failing.append(name)
                continue
            facts = []
            for pod_name, info, failure in entries:
                failure = failure if failure and failure.applies_to(want) else None
                row = adaptersync.replica_row(pod_name, want, info, failure)
                facts.append(PodAdapterFacts(row, info, failure))
            previous = adapter_status_of(body)
            status = adapter_status(want, facts, previous)
            is_ready = (
                bool(status.total_replicas) and status.loaded_replicas == status.total_replicas
            )
            is_failing = not is_ready and any(f.failure for f in facts)
            ready += is_ready
            if is_failing:
                failing.append(name)
            writes.append((body, previous, status, (key, is_ready, is_failing)))
        await asyncio.gather(*(self._write(b, p, s, k) for b, p, s, k in writes))
        return ready, failing

    async def _write(
        self,
        body: Mapping[str, Any],
        previous: LoraAdapterStatus | None,
        status: LoraAdapterStatus,
        key: tuple[Any, bool, bool] | None,
    ) -> None:
        await self.write_adapter(body, previous, status)
        if key is not None:  # remembered only once written
            self.reported[body["metadata"]["name"]] = key

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


def _same_inputs(a: tuple[Any, list[Any]], b: tuple[Any, list[Any]]) -> bool:
    """Same spec, and for every pod the very same answer and failure objects."""
    (want_a, rows_a), (want_b, rows_b) = a, b
    return (
        want_a == want_b
        and len(rows_a) == len(rows_b)
        and all(
            pa == pb and ia is ib and fa is fb
            for (pa, ia, fa), (pb, ib, fb) in zip(rows_a, rows_b, strict=True)
        )
    )
