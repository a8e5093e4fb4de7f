"""The autoscaling decision: a fleet's load -> desired replicas, with its reason and numbers.

Knative's model, on the request rate of all adapters together. Ordinarily the fleet follows
the rate over the stable window; when the rate over the short panic window passes
panicThreshold percent of what the current replicas are meant to serve, it scales up at
once and does not scale down until the burst has been over for a whole stable window.
Outside panic, HPA-style stabilization damps changes: up only to the lowest recommendation
of the last scaleUpStabilizationSeconds, down only to the highest of the last
scaleDownStabilizationSeconds. Zero is reached only through the idle rule, and left at
once when requests come.

Pure: the caller passes the time and the state returned by the previous decision.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from loraplane.api import AutoscalingSpec, to_milli

from .rates import FleetLoad


class ScaleReason(StrEnum):
    """Why the decision is what it is (the ScalingActive condition's and Events' reason)."""

    SCALED_UP = "ScaledUp"
    SCALED_DOWN = "ScaledDown"
    PANIC = "Panic"
    SCALED_TO_ZERO = "ScaledToZero"
    SCALED_FROM_ZERO = "ScaledFromZero"
    AT_MAX_REPLICAS = "AtMaxReplicas"
    AT_MIN_REPLICAS = "AtMinReplicas"
    SCALE_UP_STABILIZED = "ScaleUpStabilized"
    SCALE_DOWN_STABILIZED = "ScaleDownStabilized"
    STABLE = "Stable"
    NO_METRICS = "NoMetrics"


@dataclass(frozen=True)
class ScaleState:
    """What one decision hands to the next for one BaseModelDeployment."""

    panic_since: float | None = None
    """When the current panic began; None outside panic."""
    last_burst: float | None = None
    """The latest decision that found the panic window over the threshold."""
    recommendations: tuple[tuple[float, int], ...] = ()
    """(time, bounded recommendation) within the longer stabilization window, oldest first."""

    @classmethod
    def first(cls, current: int, now: float) -> ScaleState:
        """The state of a fleet first seen at `now` (operator start): its count as a
        recommendation, so that a restart cannot scale down before a stabilization window."""
        return cls(recommendations=((now, current),))


@dataclass(frozen=True)
class Decision:
    desired: int
    """Replicas the Deployment should have."""
    reason: ScaleReason
    message: str
    """The numbers behind the decision, for the condition and the Event."""
    state: ScaleState
    """Pass to the next decide()."""
    recommended: int
    """Replicas the load alone asks for, before bounds and stabilization."""
    panic: bool


@dataclass(frozen=True)
class _Demand:
    """The load in thousandths of a request per second, and the replicas it asks for."""

    stable_milli: int
    panic_milli: int
    target_milli: int

    @classmethod
    def of(cls, spec: AutoscalingSpec, load: FleetLoad) -> _Demand:
        target = to_milli(spec.target_requests_per_second)
        assert load.stable_rate is not None and load.panic_rate is not None
        # A pod with a queue serves at least its target, whatever it finished lately (long
        # generations finish slowly), and the requests waiting now should be served within
        # a stable window on top of what keeps arriving.
        floor = load.saturated * target
        backlog = _ceil_div(load.waiting * 1000, spec.stable_window_seconds)
        return cls(
            stable_milli=max(round(load.stable_rate * 1000), floor) + backlog,
            panic_milli=max(round(load.panic_rate * 1000), floor) + backlog,
            target_milli=target,
        )

    @property
    def stable_replicas(self) -> int:
        return _ceil_div(self.stable_milli, self.target_milli)

    @property
    def panic_replicas(self) -> int:
        return _ceil_div(self.panic_milli, self.target_milli)

    def bursting(self, spec: AutoscalingSpec, current: int) -> bool:
        served = max(current, 1) * self.target_milli
        return self.panic_milli * 100 >= spec.panic_threshold * served


def decide(
    spec: AutoscalingSpec,
    current: int,
    load: FleetLoad,
    state: ScaleState | None,
    now: float,
) -> Decision:
    """Replicas for a fleet that the Deployment now asks `current` of.

    `state` is the previous Decision's state, None for the first decision of this process.
    """
    if current < 0:
        raise ValueError(f"current replicas cannot be negative, got {current}")
    state = state if state is not None else ScaleState.first(current, now)
    if not load.measured:
        return _without_metrics(spec, current, load, state)
    demand = _Demand.of(spec, load)
    if _idle(spec, current, load, demand):
        return _to_zero(spec, current, load)
    state, panic = _panic(spec, current, demand, state, now)
    recommended = max(demand.stable_replicas, demand.panic_replicas if panic else 0)
    lo, hi = max(spec.min_replicas, 1), spec.max_replicas
    bounded = min(max(recommended, lo), hi)
    keep = max(spec.scale_up_stabilization_seconds, spec.scale_down_stabilization_seconds)
    recent = tuple((t, r) for t, r in state.recommendations if now - t < keep)
    state = replace(state, recommendations=(*recent, (now, bounded)))
    desired, note = _stabilize(spec, current, bounded, state, now, panic)
    desired = min(max(desired, lo), hi)
    reason = _reason(spec, current, desired, recommended, panic, note)
    message = _message(spec, current, desired, recommended, load, reason, note)
    return Decision(desired, reason, message, state, recommended, panic)


def _without_metrics(
    spec: AutoscalingSpec, current: int, load: FleetLoad, state: ScaleState
) -> Decision:
    desired = min(max(current, spec.min_replicas), spec.max_replicas)
    if load.held > 0:
        desired = max(desired, 1)
    why = (
        "the first scrape is only a baseline"
        if load.stable_rate is None
        else f"no pod answered /metrics (0 of {load.pods})"
    )
    held = f", {load.held} requests held" if load.held else ""
    change = f"{current} -> {_replicas(desired)}" if desired != current else f"keeping {current}"
    message = f"{why}{held}: {change}"
    return Decision(desired, ScaleReason.NO_METRICS, message, state, desired, False)


def _idle(spec: AutoscalingSpec, current: int, load: FleetLoad, demand: _Demand) -> bool:
    """True when the fleet may be (or stay) at zero."""
    if spec.min_replicas > 0 or load.held > 0 or load.in_flight > 0:
        return False
    if current == 0:  # at zero, only a request wakes it
        return demand.stable_milli == 0 and demand.panic_milli == 0
    return load.idle_seconds >= spec.scale_to_zero_idle_seconds


def _to_zero(spec: AutoscalingSpec, current: int, load: FleetLoad) -> Decision:
    if current == 0:
        message = (
            f"at zero, no requests for {load.idle_seconds:.0f}s; a request held by the router "
            "or minReplicas >= 1 brings a replica back"
        )
    else:
        message = (
            f"no requests for {load.idle_seconds:.0f}s (scaleToZeroIdleSeconds "
            f"{spec.scale_to_zero_idle_seconds}): {current} -> 0"
        )
    # Leaving zero is immediate, so nothing from before is worth carrying.
    return Decision(0, ScaleReason.SCALED_TO_ZERO, message, ScaleState(), 0, False)


def _panic(
    spec: AutoscalingSpec, current: int, demand: _Demand, state: ScaleState, now: float
) -> tuple[ScaleState, bool]:
    if demand.bursting(spec, current):
        since = now if state.panic_since is None else state.panic_since
        return replace(state, panic_since=since, last_burst=now), True
    if state.last_burst is not None and now - state.last_burst < spec.stable_window_seconds:
        # The burst is not yet all inside the stable window: its rate would still rise.
        return state, True
    return replace(state, panic_since=None, last_burst=None), False


def _stabilize(
    spec: AutoscalingSpec, current: int, bounded: int, state: ScaleState, now: float, panic: bool
) -> tuple[int, str]:
    """The count to set, and a note when stabilization held it back from `bounded`."""
    if current == 0 or (panic and bounded >= current):
        return bounded, ""
    if panic:
        return current, f"panic holds {current} until the burst is over"
    if bounded > current:
        window = spec.scale_up_stabilization_seconds
        desired = max(current, min(_within(state, now, window)))
        kind = "lowest"
    elif bounded < current:
        window = spec.scale_down_stabilization_seconds
        desired = min(current, max(_within(state, now, window)))
        kind = "highest"
    else:
        return bounded, ""
    if desired == bounded:
        return desired, ""
    return desired, f"the {kind} recommendation of the last {window}s is {desired}"


def _within(state: ScaleState, now: float, window: int) -> list[int]:
    """The recommendations of the last `window` seconds; the newest one (made now) always."""
    *older, (_, newest) = state.recommendations
    return [r for t, r in older if now - t < window] + [newest]


def _reason(
    spec: AutoscalingSpec, current: int, desired: int, recommended: int, panic: bool, note: str
) -> ScaleReason:
    if current == 0:
        return ScaleReason.SCALED_FROM_ZERO
    if panic:
        return ScaleReason.PANIC
    if recommended > spec.max_replicas and desired == spec.max_replicas:
        return ScaleReason.AT_MAX_REPLICAS
    if desired > current:
        return ScaleReason.SCALED_UP
    if desired < current:
        return ScaleReason.SCALED_DOWN
    if note:
        return (
            ScaleReason.SCALE_UP_STABILIZED
            if recommended > current
            else ScaleReason.SCALE_DOWN_STABILIZED
        )
    if recommended < spec.min_replicas:
        return ScaleReason.AT_MIN_REPLICAS
    return ScaleReason.STABLE


def _message(
    spec: AutoscalingSpec,
    current: int,
    desired: int,
    recommended: int,
    load: FleetLoad,
    reason: ScaleReason,
    note: str,
) -> str:
    head = f"{current} -> {_replicas(desired)}" if desired != current else _replicas(current)
    parts = [
        f"{head}; load wants {recommended}: {load.stable_rate:.2f} req/s over "
        f"{spec.stable_window_seconds}s, {load.panic_rate:.2f} over {spec.panic_window_seconds}s, "
        f"target {spec.target_requests_per_second} per replica"
    ]
    if load.waiting or load.saturated:
        parts.append(
            f"{load.queued} queued in {load.saturated} saturated pods, {load.held} held by the router"
        )
    if load.answered < load.pods:
        parts.append(f"{load.pods - load.answered} of {load.pods} pods did not answer /metrics")
    if reason is ScaleReason.PANIC:
        parts.append(
            f"panic: the {spec.panic_window_seconds}s rate passed {spec.panic_threshold}% of "
            f"what {_replicas(max(current, 1))} serve; no scale-down until "
            f"{spec.stable_window_seconds}s after the burst"
        )
    if recommended > spec.max_replicas:
        parts.append(f"maxReplicas is {spec.max_replicas}")
    if reason is ScaleReason.AT_MIN_REPLICAS:
        parts.append(f"minReplicas is {spec.min_replicas}")
    if spec.min_replicas == 0 and desired > 0 and recommended == 0:
        parts.append(
            f"zero after {spec.scale_to_zero_idle_seconds}s without requests "
            f"(idle {load.idle_seconds:.0f}s)"
        )
    if note:
        parts.append(note)
    return "; ".join(parts)


def _replicas(n: int) -> str:
    return "1 replica" if n == 1 else f"{n} replicas"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
