"""One base's autoscaler loop: scrape its pods, turn counters into rates, decide, hand over.

The decision itself is pure (`rates.RateTracker`, `autoscaler.decide`); this module only
gathers the samples, keeps the state between ticks, and gives the result to the base's
Fleet, which applies it to the Deployment and to status like any other change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from loraplane.api import BASE_MODEL_DEPLOYMENT, BaseModelDeployment, ConditionStatus, format_milli

from .autoscaler import ScaleReason, ScaleState, decide
from .demand import (
    RouterMetricsError,
    RouterSample,
    RouterTarget,
    held_requests,
    parse_router_metrics,
    router_targets,
)
from .fleet import Fleet, ScalingReport
from .pods import RuntimePod
from .rates import MetricsError, PodSample, RateTracker, parse_metrics
from .runtimeclient import PodAddress, RuntimeCallError
from .status import Reason

# With autoscaling off the rate is still measured for status.requestRate, over these windows.
DEFAULT_WINDOWS = (60, 6)


class Scaler:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.rates = RateTracker()
        self.state: ScaleState | None = None
        self.enabled = False

    async def tick(
        self,
        base: Mapping[str, Any],
        pod_bodies: Sequence[Mapping[str, Any]],
        router_bodies: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        fleet = self.fleet
        bmd = BaseModelDeployment.model_validate(
            {"metadata": {"name": fleet.name}, "spec": base.get("spec") or {}}
        )
        pods = [p for p in map(RuntimePod.of, pod_bodies) if p.serving_capable]
        samples = dict(
            zip(
                (p.name for p in pods),
                await asyncio.gather(*(self._scrape(p, bmd.spec.runtime.port) for p in pods)),
                strict=True,
            )
        )
        held = held_requests(
            await asyncio.gather(*(self._scrape_router(t) for t in router_targets(router_bodies)))
        )
        now = time.monotonic()
        self.rates.observe(now, samples, held)
        spec = bmd.spec.autoscaling
        labels = {"namespace": fleet.namespace, "base": fleet.name}
        fleet.metrics.replicas.labels(**labels).set(len(pods))
        if spec is None or not spec.enabled:
            self.state, self.enabled = None, False  # a re-enable starts afresh
            load = self.rates.load(*DEFAULT_WINDOWS)
            report = ScalingReport(
                rate=_rate(load.stable_rate),
                condition=(
                    ConditionStatus.FALSE,
                    Reason.AUTOSCALING_DISABLED,
                    "spec.replicas sets the replica count (kubectl scale, an HPA or KEDA)",
                ),
            )
            self._hand_over(report, desired=None)
            return
        load = self.rates.load(spec.stable_window_seconds, spec.panic_window_seconds)
        current = fleet.replicas_for(bmd)
        decision = decide(spec, current, load, self.state, now)
        self.state, self.enabled = decision.state, True
        active = (
            ConditionStatus.FALSE
            if decision.reason == ScaleReason.NO_METRICS
            else ConditionStatus.TRUE
        )
        report = ScalingReport(
            rate=_rate(load.stable_rate),
            condition=(active, decision.reason, decision.message),
        )
        if load.stable_rate is not None:
            fleet.metrics.request_rate.labels(**labels).set(load.stable_rate)
        fleet.metrics.desired_replicas.labels(**labels).set(decision.desired)
        if decision.desired != current:
            report.last_scale_time = datetime.now(UTC).replace(microsecond=0)
            fleet.metrics.scale_events.labels(**labels, reason=decision.reason).inc()
            involved = {
                "apiVersion": base.get("apiVersion"),
                "kind": BASE_MODEL_DEPLOYMENT.kind,
                "metadata": base.get("metadata") or {},
            }
            await fleet.kube.event(involved, "Normal", str(decision.reason), decision.message)
        self._hand_over(report, desired=decision.desired)

    def _hand_over(self, report: ScalingReport, desired: int | None) -> None:
        fleet = self.fleet
        changed = desired != fleet.desired_replicas or (
            fleet.scaling is None or fleet.scaling.condition[:2] != report.condition[:2]
        )
        if fleet.scaling is not None and report.last_scale_time is None:
            report.last_scale_time = fleet.scaling.last_scale_time
        fleet.desired_replicas, fleet.scaling = desired, report
        if (
            changed
        ):  # the fleet applies the count and writes status; rates alone wait for its resync
            fleet.poke()

    async def _scrape_router(self, target: RouterTarget) -> RouterSample | None:
        """Requests a router holds: at zero replicas the only sign of demand."""
        try:
            address = PodAddress(target.pod, target.ip, target.port)
            return parse_router_metrics(await self.fleet.runtime.metrics(address))
        except (RuntimeCallError, RouterMetricsError):
            return None

    async def _scrape(self, pod: RuntimePod, port: int) -> PodSample | None:
        """A pod's counters, or None: a failed scrape is a gap, never a zero."""
        try:
            async with self.fleet.pod_calls:
                text = await self.fleet.runtime.metrics(PodAddress(pod.name, pod.ip or "", port))
            return parse_metrics(text)
        except (RuntimeCallError, MetricsError):
            return None


def _rate(rate: float | None) -> str | None:
    return None if rate is None else format_milli(rate)
