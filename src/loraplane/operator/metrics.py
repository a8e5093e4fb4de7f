"""The operator's own Prometheus metrics: syncs, adapter loads and failures, pods out of sync."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.syncs = Counter(
            "loraplane_operator_syncs",
            "Fleet syncs (one base's pods, adapters, status)",
            ["result"],
            registry=r,
        )
        self.sync_seconds = Histogram(
            "loraplane_operator_sync_seconds",
            "Duration of one fleet sync",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.load_seconds = Histogram(
            "loraplane_operator_adapter_load_seconds",
            "PUT of one adapter into one pod, until the pod answered",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.load_failures = Counter(
            "loraplane_operator_adapter_load_failures",
            "Adapter loads a pod refused or failed, by the runtime's error code",
            ["reason"],
            registry=r,
        )
        self.unloads = Counter(
            "loraplane_operator_adapter_unloads", "Adapters unloaded from a pod", registry=r
        )
        self.pods_out_of_sync = Gauge(
            "loraplane_operator_pods_out_of_sync",
            "Serving-capable pods missing at least one adapter they should hold",
            ["namespace", "base"],
            registry=r,
        )
        base = ["namespace", "base"]
        self.request_rate = Gauge(
            "loraplane_operator_request_rate",
            "Requests per second over all replicas and adapters (stable window)",
            base,
            registry=r,
        )
        self.desired_replicas = Gauge(
            "loraplane_operator_desired_replicas", "Replicas the operator wants", base, registry=r
        )
        self.replicas = Gauge(
            "loraplane_operator_replicas", "Runtime pods serving-capable now", base, registry=r
        )
        self.scale_events = Counter(
            "loraplane_operator_scale_events",
            "Replica count changes the autoscaler made, by reason",
            [*base, "reason"],
            registry=r,
        )
