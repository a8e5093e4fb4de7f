"""What the router knows of its base: the ready pods, and which of them hold each adapter.

Built from the resources alone, as a watch delivers them: Pods (ready, address), LoraAdapters
(`status.replicas[]`, the operator's verified residency) and the BaseModelDeployment (its
names for /v1/models). Plain state changed by plain calls, on one event loop: no I/O here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from loraplane.api import AdapterState, LoraAdapterSpec, LoraAdapterStatus, ModelSpec
from loraplane.api.wire import redact_source

log = logging.getLogger(__name__)
HTTP_PORT_NAME = "http"  # the runtime container's serving port, as the operator names it


@dataclass(frozen=True)
class Backend:
    """A runtime pod that takes requests: Ready (its adapters gate open) and not terminating."""

    name: str
    ip: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class AdapterRoute:
    """One LoraAdapter of the base, as the router uses it."""

    resource: str
    served_name: str
    holders: frozenset[str]
    """Pods whose row says Loaded: the operator listed the adapter on them."""
    ready: bool
    """Its Ready condition: listed in /v1/models."""
    root: str
    """Its source, redacted."""
    created: int


@dataclass(frozen=True)
class BaseInfo:
    name: str
    aliases: frozenset[str]
    """Other names clients may use for the base model (its source, as the runtime accepts)."""
    root: str
    created: int
    port: int


def backend_of(pod: Mapping[str, Any], default_port: int) -> Backend | None:
    """The pod as a place to send requests; None while it must not get any."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    ip = status.get("podIP")
    # A deleted pod stays Ready through its grace period; it drains and must get nothing new.
    if not ip or meta.get("deletionTimestamp") or not _condition_true(status, "Ready"):
        return None
    return Backend(meta.get("name", ""), ip, _http_port(pod, default_port))


def is_starting(pod: Mapping[str, Any]) -> bool:
    """A pod that will serve once it is Ready: it exists and is not going away."""
    meta = pod.get("metadata") or {}
    phase = (pod.get("status") or {}).get("phase")
    return not meta.get("deletionTimestamp") and phase in (None, "Pending", "Running")


def adapter_of(body: Mapping[str, Any], base: str) -> AdapterRoute | None:
    """A LoraAdapter of this base as a route; None when it is of another base, being deleted,
    or not readable (written by a newer API than this router knows)."""
    meta = body.get("metadata") or {}
    spec_body = body.get("spec") or {}
    if spec_body.get("baseModel") != base or meta.get("deletionTimestamp"):
        return None
    try:
        spec = LoraAdapterSpec.model_validate(spec_body)
        status = LoraAdapterStatus.model_validate(body.get("status") or {})
    except ValidationError as e:
        log.warning("LoraAdapter %s ignored: %s", meta.get("name"), e)
        return None
    holders = frozenset(r.pod for r in status.replicas or () if r.state == AdapterState.LOADED)
    ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or ())
    return AdapterRoute(
        resource=meta.get("name", ""),
        served_name=spec.served_name or meta.get("name", ""),
        holders=holders,
        ready=ready,
        root=redact_source(spec.source),
        created=_epoch(meta.get("creationTimestamp")),
    )


def base_of(body: Mapping[str, Any], name: str) -> BaseInfo:
    """The BaseModelDeployment's names and port, as its runtime pods answer to them."""
    spec = body.get("spec") or {}
    try:
        model = ModelSpec.model_validate(spec.get("model") or {})
        source = model.source
        root = f"{source}@{model.revision}" if model.revision else source
    except ValidationError:
        source, root = "", ""
    port = (spec.get("runtime") or {}).get("port") or 8000
    return BaseInfo(
        name=name,
        aliases=frozenset({source} - {""}),
        root=redact_source(root),
        created=_epoch((body.get("metadata") or {}).get("creationTimestamp")),
        port=int(port),
    )


class Table:
    """The base, its routable pods and its adapters, kept current by watch events."""

    def __init__(self, base: str) -> None:
        self.base = BaseInfo(base, frozenset(), "", 0, 8000)
        self.base_exists = False
        self.backends: dict[str, Backend] = {}
        self.admitted: dict[str, int] = {}
        """Pod -> when it last became routable (a count): a pod that failed a request is
        avoided until it has been out of service and back (a restart), not for ever."""
        self._admissions = 0
        self.starting: set[str] = set()  # pods that exist and are not routable yet
        self.adapters: dict[str, AdapterRoute] = {}  # LoraAdapter name ->
        self.served: dict[str, set[str]] = {}  # served name -> LoraAdapter names
        self._pods: dict[str, Mapping[str, Any]] = {}

    # ---- changes ----------------------------------------------------------------------------

    def set_base(self, body: Mapping[str, Any] | None) -> None:
        self.base_exists = body is not None
        if body is not None:
            self.base = base_of(body, self.base.name)
            for name, pod in self._pods.items():  # the port may have changed
                self._place(name, pod)

    def put_pod(self, pod: Mapping[str, Any]) -> None:
        name = (pod.get("metadata") or {}).get("name", "")
        self._pods[name] = pod
        self._place(name, pod)

    def drop_pod(self, name: str) -> None:
        self._pods.pop(name, None)
        self.backends.pop(name, None)
        self.admitted.pop(name, None)
        self.starting.discard(name)

    def set_pods(self, pods: Iterable[Mapping[str, Any]]) -> None:
        for name in list(self._pods):
            self.drop_pod(name)
        for pod in pods:
            self.put_pod(pod)

    def put_adapter(self, body: Mapping[str, Any]) -> None:
        name = (body.get("metadata") or {}).get("name", "")
        self.drop_adapter(name)
        route = adapter_of(body, self.base.name)
        if route is not None:
            self.adapters[name] = route
            self.served.setdefault(route.served_name, set()).add(name)

    def drop_adapter(self, name: str) -> None:
        old = self.adapters.pop(name, None)
        if old is not None:
            names = self.served.get(old.served_name, set())
            names.discard(name)
            if not names:
                self.served.pop(old.served_name, None)

    def set_adapters(self, bodies: Iterable[Mapping[str, Any]]) -> None:
        self.adapters.clear()
        self.served.clear()
        for body in bodies:
            self.put_adapter(body)

    def _place(self, name: str, pod: Mapping[str, Any]) -> None:
        backend = backend_of(pod, self.base.port)
        was = self.backends.pop(name, None)
        self.starting.discard(name)
        if backend is not None:
            self.backends[name] = backend
            if was is None:
                self._admissions += 1
                self.admitted[name] = self._admissions
            return
        self.admitted.pop(name, None)
        if is_starting(pod):
            self.starting.add(name)

    # ---- questions --------------------------------------------------------------------------

    def is_base(self, model: str | None) -> bool:
        return not model or model == self.base.name or model in self.base.aliases

    def serves(self, served_name: str) -> bool:
        return served_name in self.served

    def holders(self, served_name: str) -> frozenset[str]:
        """Pods the operator verified hold the adapter (ready or not)."""
        names = self.served.get(served_name, ())
        if len(names) == 1:
            return self.adapters[next(iter(names))].holders
        return frozenset().union(*(self.adapters[n].holders for n in names))

    def ready_adapters(self) -> list[AdapterRoute]:
        """One route per served name whose adapter is Ready, by served name."""
        seen: dict[str, AdapterRoute] = {}
        for route in sorted(self.adapters.values(), key=lambda r: (r.created, r.resource)):
            if route.ready:
                seen.setdefault(route.served_name, route)
        return [seen[k] for k in sorted(seen)]


def _condition_true(status: Mapping[str, Any], type_: str) -> bool:
    return any(
        c.get("type") == type_ and c.get("status") == "True" for c in status.get("conditions") or ()
    )


def _http_port(pod: Mapping[str, Any], default: int) -> int:
    for container in (pod.get("spec") or {}).get("containers") or ():
        for port in container.get("ports") or ():
            if port.get("name") == HTTP_PORT_NAME and port.get("containerPort"):
                return int(port["containerPort"])
    return default


def _epoch(timestamp: str | None) -> int:
    if not timestamp:
        return 0
    return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp())
