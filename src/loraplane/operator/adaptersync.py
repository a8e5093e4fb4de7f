"""Adapter sync as pure decisions: what each pod should load and unload, what it holds, and
whether its readiness gate may open.

Inputs are plain snapshots (the adapters wanted, each pod's answer to GET /v1/adapters, the
failures remembered per pod); outputs are plans and rows. Nothing here talks to a pod or to
the API server, so every rule has a unit test with no cluster.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from loraplane.api import AdapterState, LoraAdapter, ReplicaAdapterStatus
from loraplane.api.wire import (
    PERMANENT_ERRORS,
    REPLICA_STATE,
    AdapterInfo,
    AdapterLoadRequest,
    RuntimeAdapterState,
    redact_source,
)

BACKOFF_FIRST_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 300.0


@dataclass(frozen=True)
class DesiredAdapter:
    """A LoraAdapter as every pod of its base should hold it."""

    name: str  # the LoraAdapter's metadata.name
    served_name: str  # the pods' name for it
    source: str
    revision: str | None
    sha256: str | None
    pinned: bool
    secret_name: str | None
    generation: int

    @classmethod
    def of(cls, adapter: LoraAdapter) -> DesiredAdapter:
        spec = adapter.spec
        return cls(
            name=adapter.metadata.name or "",
            served_name=adapter.served_name,
            source=spec.source,
            revision=spec.revision,
            sha256=spec.sha256.lower() if spec.sha256 else None,
            pinned=spec.pinned,
            secret_name=spec.secret_ref.name if spec.secret_ref else None,
            generation=adapter.metadata.generation or 0,
        )

    @property
    def fingerprint(self) -> tuple[str, str | None, str | None]:
        """What makes a load the same load: a change of any of these loads again."""
        return (self.source, self.revision, self.sha256)

    def request(self, credentials: Mapping[str, str] | None) -> AdapterLoadRequest:
        return AdapterLoadRequest(
            source=self.source,
            revision=self.revision,
            sha256=self.sha256,
            pinned=self.pinned,
            credentials=dict(credentials) if credentials else None,
        )

    def held_by(self, info: AdapterInfo | None) -> bool:
        """Whether a pod's entry is this adapter, loaded (its weights in some tier)."""
        return info is not None and info.state == RuntimeAdapterState.LOADED and self.matches(info)

    def matches(self, info: AdapterInfo) -> bool:
        # Pods report sources redacted (a presigned query is secret): compare in that form.
        # A new query alone (a fresh presigned URL) is the same source; pin sha256 to tell.
        return (
            info.source == redact_source(self.source)
            and info.revision == self.revision
            and (self.sha256 is None or (info.sha256 or "").lower() == self.sha256)
        )


@dataclass(frozen=True)
class Failure:
    """A refused or failed load of one adapter on one pod, remembered to back off."""

    fingerprint: tuple[str, str | None, str | None]
    code: str
    message: str
    permanent: bool  # only a change of the adapter (or a new pod) can fix it
    attempts: int
    retry_at: float

    @classmethod
    def after(
        cls, previous: Failure | None, desired: DesiredAdapter, code: str, message: str, now: float
    ) -> Failure:
        same = previous is not None and previous.fingerprint == desired.fingerprint
        attempts = previous.attempts + 1 if same and previous else 1
        delay = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** (attempts - 1))
        return cls(
            fingerprint=desired.fingerprint,
            code=code,
            message=message,
            permanent=code in PERMANENT_ERRORS,
            attempts=attempts,
            retry_at=now + delay,
        )

    def applies_to(self, desired: DesiredAdapter) -> bool:
        return self.fingerprint == desired.fingerprint


@dataclass
class PodMemory:
    """What the fleet knows about one pod beyond the Pod API: what it holds, what failed."""

    incarnation: tuple[Any, ...]
    actual: dict[str, AdapterInfo] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    measured_at: float = 0.0


@dataclass(frozen=True)
class PodPlan:
    loads: tuple[DesiredAdapter, ...] = ()
    unloads: tuple[str, ...] = ()  # served names

    def __bool__(self) -> bool:
        return bool(self.loads or self.unloads)


def plan_pod(
    desired: Mapping[str, DesiredAdapter],
    actual: Mapping[str, AdapterInfo],
    failures: Mapping[str, Failure],
    now: float,
) -> PodPlan:
    """Loads for what is missing or changed, unloads for what nobody wants.

    A load still in flight on the pod is left alone; a failed load waits for its back-off,
    and a permanent refusal waits for the adapter to change.
    """
    loads = []
    for served, want in sorted(desired.items()):
        info = actual.get(served)
        if want.held_by(info):
            continue
        if info is not None and info.state == RuntimeAdapterState.LOADING and want.matches(info):
            continue
        failure = failures.get(served)
        waiting = failure is not None and failure.applies_to(want)
        if waiting and failure is not None and (failure.permanent or failure.retry_at > now):
            continue
        loads.append(want)
    unloads = tuple(
        sorted(
            name
            for name, info in actual.items()
            if name not in desired and info.state != RuntimeAdapterState.UNLOADING
        )
    )
    return PodPlan(tuple(loads), unloads)


def replica_row(
    pod: str,
    want: DesiredAdapter,
    info: AdapterInfo | None,
    failure: Failure | None,
) -> ReplicaAdapterStatus:
    """The adapter on one pod, as status.replicas[] shows it."""
    if want.held_by(info):
        assert info is not None
        return ReplicaAdapterStatus(pod=pod, state=AdapterState.LOADED, loaded_at=info.loaded_at)
    if failure is not None and failure.applies_to(want):
        return ReplicaAdapterStatus(
            pod=pod, state=AdapterState.FAILED, message=_clip(failure.message)
        )
    if info is not None and want.matches(info):
        state = REPLICA_STATE[info.state]
        return ReplicaAdapterStatus(pod=pod, state=state, message=_clip(info.error or "") or None)
    return ReplicaAdapterStatus(pod=pod, state=AdapterState.PENDING)


def _clip(text: str, limit: int = 1000) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class GateView:
    """What the gate decision needs to know about one pod."""

    name: str
    open: bool
    actual: Mapping[str, AdapterInfo]
    failures: Mapping[str, Failure]


def established(desired: Iterable[DesiredAdapter], pods: Iterable[GateView]) -> set[str]:
    """Adapters some serving pod (gate open) holds: every new pod must hold them too.

    An adapter no serving pod holds (new, or failing everywhere) does not keep a pod out of
    service: the others keep working while it is fixed.
    """
    serving = [p for p in pods if p.open]
    return {
        d.served_name
        for d in desired
        if any(d.held_by(p.actual.get(d.served_name)) for p in serving)
    }


def gate_may_open(
    pod: GateView, desired: Iterable[DesiredAdapter], required: set[str]
) -> tuple[bool, str]:
    """Whether the pod may take traffic, and why not: it holds every established adapter and
    has tried every other one (held, or failed on this pod)."""
    missing, untried = [], []
    for want in desired:
        if want.held_by(pod.actual.get(want.served_name)):
            continue
        if want.served_name in required:
            missing.append(want.served_name)
            continue
        failure = pod.failures.get(want.served_name)
        if failure is None or not failure.applies_to(want):
            untried.append(want.served_name)
    if missing:
        return False, f"waiting for adapters the serving pods hold: {', '.join(sorted(missing))}"
    if untried:
        return False, f"loading adapters: {', '.join(sorted(untried))}"
    return True, ""


def gate_is_stale(gate_since: datetime | None, container_started: datetime | None) -> bool:
    """A container that started after the gate opened is a restarted runtime, which comes back
    empty: its gate must close until the operator sees the adapters loaded again."""
    return (
        gate_since is not None and container_started is not None and container_started > gate_since
    )
