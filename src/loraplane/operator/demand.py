"""Demand the routers hold: requests waiting for a ready pod, from each router's /metrics.

A base at zero replicas has no pod to scrape, so its only sign of demand is what its routers
hold. The operator scrapes every router pod of the base (routing.selector_labels, port
wire.ROUTER_METRICS_PORT, path wire.METRICS_PATH), parses each answer here and passes
`held_requests(...)` to RateTracker.observe(..., held=) each round; the autoscaler then never
leaves a base at zero while a request is held, and counts held requests as load.

Pure: text in, numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from loraplane.api.wire import (
    ROUTER_METRIC_HELD,
    ROUTER_METRIC_REQUESTS_TOTAL,
    ROUTER_METRICS_PORT,
)


class RouterMetricsError(ValueError):
    """A /metrics answer that is not a loraplane router's."""


@dataclass(frozen=True)
class RouterSample:
    """One scrape of one router pod."""

    held: int
    """Requests it holds now, over all adapters."""
    held_by_adapter: Mapping[str, int] = field(default_factory=dict)
    requests_by_adapter: Mapping[str, float] = field(default_factory=dict)
    """Requests it answered since it started (a counter), by adapter, every code included."""


def parse_router_metrics(text: str) -> RouterSample:
    """The sample in a router pod's /metrics text; RouterMetricsError when it is not one."""
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as e:
        raise RouterMetricsError(f"/metrics is not Prometheus text format: {e}") from None
    held: dict[str, int] = {}
    requests: dict[str, float] = {}
    seen = False
    for family in families:
        seen = seen or family.name == ROUTER_METRIC_HELD
        for sample in family.samples:
            if sample.name == ROUTER_METRIC_HELD:
                adapter = sample.labels.get("adapter", "")
                held[adapter] = held.get(adapter, 0) + round(_count(sample.name, sample.value))
            elif sample.name == ROUTER_METRIC_REQUESTS_TOTAL:
                adapter = sample.labels.get("adapter", "")
                requests[adapter] = requests.get(adapter, 0.0) + _count(sample.name, sample.value)
    if not seen:
        raise RouterMetricsError(
            f"/metrics has no {ROUTER_METRIC_HELD}: is this a loraplane router's metrics port?"
        )
    return RouterSample(
        held=sum(held.values()),
        held_by_adapter={a: n for a, n in sorted(held.items()) if n},
        requests_by_adapter=dict(sorted(requests.items())),
    )


@dataclass(frozen=True)
class RouterTarget:
    """Where one router pod's /metrics answers."""

    pod: str
    ip: str
    port: int = ROUTER_METRICS_PORT


def router_targets(pods: Iterable[Mapping[str, Any]]) -> list[RouterTarget]:
    """The router pods (selected by routing.selector_labels) worth scraping: every one with an
    address, terminating ones included, since a router draining still holds requests."""
    out = []
    for pod in pods:
        ip = (pod.get("status") or {}).get("podIP")
        name = (pod.get("metadata") or {}).get("name", "")
        if ip:
            out.append(RouterTarget(name, ip))
    return sorted(out, key=lambda t: t.pod)


def held_requests(samples: Iterable[RouterSample | None]) -> int:
    """Requests held over a base's routers; a failed scrape (None) adds nothing this round."""
    return sum(s.held for s in samples if s is not None)


def _count(name: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise RouterMetricsError(f"/metrics gives {name} = {value}; a count is finite and >= 0")
    return value
