"""The router's Prometheus metrics, per adapter: requests, holds, latency, upstream errors."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from loraplane.api.wire import (
    ROUTER_METRIC_DURATION,
    ROUTER_METRIC_HELD,
    ROUTER_METRIC_IN_FLIGHT,
    ROUTER_METRIC_REQUESTS,
    ROUTER_METRIC_ROUTED,
    ROUTER_METRIC_UPSTREAM_ERRORS,
)

# From a fast answer through a proxy to a long generation.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
HOLD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            ROUTER_METRIC_REQUESTS,
            "Requests answered, by adapter (the base's name for the base) and HTTP code",
            ["adapter", "code"],
            registry=r,
        )
        self.duration = Histogram(
            ROUTER_METRIC_DURATION,
            "Seconds from a request's arrival to the end of its answer, holds included",
            ["adapter"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.held = Gauge(
            ROUTER_METRIC_HELD,
            "Requests held now because no ready pod can take them (the autoscaler's demand)",
            ["adapter"],
            registry=r,
        )
        self.hold_seconds = Histogram(
            "loraplane_router_hold_seconds",
            "Seconds a held request waited, by how the hold ended",
            ["outcome"],
            buckets=HOLD_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            ROUTER_METRIC_IN_FLIGHT,
            "Requests sent to pods and not finished",
            ["adapter"],
            registry=r,
        )
        self.upstream_errors = Counter(
            ROUTER_METRIC_UPSTREAM_ERRORS,
            "Tries that failed on a pod, by adapter and how (unreachable, broken, draining, "
            "overloaded, timeout, cut)",
            ["adapter", "kind"],
            registry=r,
        )
        self.routed = Counter(
            ROUTER_METRIC_ROUTED,
            "Tries sent to a pod, by adapter and residency (hit: the pod holds the adapter; "
            "fallback: no ready pod did)",
            ["adapter", "residency"],
            registry=r,
        )
        self.ready_pods = Gauge(
            "loraplane_router_ready_pods", "Runtime pods the router sends requests to", registry=r
        )

        self._children: dict[tuple[object, ...], Any] = {}

    def set_held(self, label: str, count: int) -> None:
        self.held.labels(adapter=label).set(count)

    def answered(self, label: str, code: str, seconds: float) -> None:
        """One request done: its code and how long it took, arrival to last byte."""
        self._child(self.requests, label, code).inc()
        self._child(self.duration, label).observe(seconds)

    def routed_to(self, label: str, hit: bool) -> None:
        self._child(self.routed, label, "hit" if hit else "fallback").inc()

    def _child(self, metric: Any, *values: str) -> Any:
        # labels() takes a lock and builds a key on every call: a hot path keeps its own map.
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child
