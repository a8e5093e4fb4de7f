"""Request rates of a fleet of runtime pods, from their /metrics scrapes over time.

The runtime counts finished requests (every adapter, every status, 429s included) in
`loraplane_requests_total`. The operator scrapes every pod every few seconds; this module
turns those counters into requests per second over a window (plus the growth of the requests
waiting in queues or held by the router: what arrived and could not be served yet), and is
robust to what a fleet does between two scrapes:

- a pod restarts: its counter drops (or its series are created anew), so the new value is
  what it counted since the restart;
- a pod appears: its first sample is only a baseline, whatever its counter says, so an
  operator restart or a pod seen late causes no jump;
- a pod goes: the requests it served stay in the window until they age out, nothing goes
  negative;
- a scrape fails: the sample is missing, not zero; the next good sample covers the whole gap,
  and meanwhile the pod counts at its own recent rate.

Pure: no clock (every call is given `now`, a monotonic time in seconds), no I/O.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from loraplane.api.wire import (
    METRIC_IN_FLIGHT,
    METRIC_QUEUE_DEPTH,
    METRIC_REQUESTS,
    METRIC_REQUESTS_TOTAL,
)

# prometheus-client exports each counter series' creation time (wall clock) beside it; the
# earliest one changes when the process restarts, even if the new counter already passed the
# old value by the next scrape.
_CREATED = f"{METRIC_REQUESTS}_created"
# The largest stableWindowSeconds the API allows: history older than this is never read.
DEFAULT_RETENTION_SECONDS = 3600.0


class MetricsError(ValueError):
    """A pod's /metrics answer is not what a loraplane runtime exports."""


@dataclass(frozen=True)
class PodSample:
    """One scrape of one runtime pod."""

    requests: float
    """loraplane_requests_total summed over adapters and statuses."""
    by_adapter: Mapping[str, float] = field(default_factory=dict)
    """The same counter per adapter label (the base model under its served name)."""
    in_flight: int = 0
    """Requests accepted and not finished, the queued ones included."""
    queued: int = 0
    """Requests waiting for their first forward pass: a pod with a queue is at capacity."""
    started: float | None = None
    """Earliest creation time of its request counters; None before its first request."""


def parse_metrics(text: str) -> PodSample:
    """The sample in a runtime pod's /metrics text; MetricsError when it is not one."""
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as e:  # the parser's only complaint about malformed text
        raise MetricsError(f"/metrics is not Prometheus text format: {e}") from None
    requests: dict[str, float] = {}
    gauges: dict[str, float] = {}
    created: list[float] = []
    seen_requests = False
    for family in families:
        for sample in family.samples:
            if sample.name == METRIC_REQUESTS_TOTAL:
                adapter = sample.labels.get("adapter", "")
                requests[adapter] = requests.get(adapter, 0.0) + _count(sample.name, sample.value)
            elif sample.name == _CREATED:
                created.append(sample.value)
            elif sample.name in (METRIC_IN_FLIGHT, METRIC_QUEUE_DEPTH):
                gauges[sample.name] = _count(sample.name, sample.value)
        # A counter with labels has no sample before its first request: its HELP/TYPE lines
        # alone say that this is a loraplane runtime which has served nothing yet.
        seen_requests = seen_requests or family.name in (METRIC_REQUESTS, METRIC_REQUESTS_TOTAL)
    missing = [name for name in (METRIC_IN_FLIGHT, METRIC_QUEUE_DEPTH) if name not in gauges]
    if not seen_requests:
        missing.insert(0, METRIC_REQUESTS_TOTAL)
    if missing:
        raise MetricsError(
            f"/metrics has no {', '.join(missing)}: is this port a loraplane runtime's? "
            "check the pod's container port and image"
        )
    return PodSample(
        requests=sum(requests.values()),
        by_adapter=requests,
        in_flight=round(gauges[METRIC_IN_FLIGHT]),
        queued=round(gauges[METRIC_QUEUE_DEPTH]),
        started=min(created) if created else None,
    )


def _count(name: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise MetricsError(f"/metrics gives {name} = {value}; a count is finite and non-negative")
    return value


@dataclass(frozen=True)
class FleetLoad:
    """What the fleet did up to the latest observation: the autoscaler's input."""

    stable_rate: float | None
    """Requests per second arriving over the stable window; None until two observations."""
    panic_rate: float | None
    """Requests per second arriving over the panic window; None until two observations."""
    by_adapter: Mapping[str, float]
    """Requests per second per adapter over the stable window."""
    in_flight: int
    """Requests in the pods now, queued ones included."""
    queued: int
    """Requests waiting in the pods for their first forward pass."""
    saturated: int
    """Pods with a queue: each is at least at capacity, whatever its rate says."""
    held: int
    """Requests the router holds while no pod can take them."""
    pods: int
    """Pods in the latest observation."""
    answered: int
    """Of those, pods whose scrape succeeded."""
    idle_seconds: float
    """Seconds since the fleet last had a request (finished, in flight, queued or held)."""

    @property
    def measured(self) -> bool:
        """False when there is no rate to act on: fewer than two observations, or no pod answered."""
        return self.stable_rate is not None and (self.pods == 0 or self.answered > 0)

    @property
    def waiting(self) -> int:
        """Requests that arrived and wait for a forward pass: queued in pods or held."""
        return self.queued + self.held


@dataclass(frozen=True)
class _Interval:
    """Requests a pod finished between two of its good samples (a share of them per second)."""

    pod: str
    start: float
    end: float
    requests: float
    by_adapter: Mapping[str, float]


@dataclass(frozen=True)
class _Observation:
    """One round of scrapes: who was there, and the fleet's gauges (last known for a pod
    whose scrape failed)."""

    time: float
    present: frozenset[str]
    failed: frozenset[str]
    held: int
    in_flight: int
    queued: int
    saturated: int

    @property
    def waiting(self) -> int:
        return self.queued + self.held


class RateTracker:
    """The recent request history of one BaseModelDeployment's pods.

    Call `observe` after every round of scrapes and `load` for the rates as of that round.
    """

    def __init__(self, retention_seconds: float = DEFAULT_RETENTION_SECONDS) -> None:
        if retention_seconds <= 0:
            raise ValueError(f"retention_seconds must be positive, got {retention_seconds}")
        self.retention_seconds = retention_seconds
        self._intervals: deque[_Interval] = deque()
        self._last: dict[str, tuple[float, PodSample]] = {}  # pod -> its latest good sample
        self._baseline: dict[str, float] = {}  # pod -> when it was first seen
        self._first: float | None = None
        self._observations: deque[_Observation] = deque()
        self._last_activity: float | None = None

    @property
    def _latest(self) -> _Observation | None:
        return self._observations[-1] if self._observations else None

    def observe(self, now: float, pods: Mapping[str, PodSample | None], held: int = 0) -> None:
        """Record one round of scrapes at `now`: every pod of the fleet, None where it failed.

        A pod left out is gone. `held` counts requests the router holds for lack of a pod.
        """
        if self._latest is not None and now <= self._latest.time:
            raise ValueError(
                f"observations must move forward in time: {now} after {self._latest.time}; "
                "pass a monotonic clock"
            )
        if held < 0:
            raise ValueError(f"held must be non-negative, got {held}")
        active = held > 0
        for pod, sample in pods.items():
            if sample is None:
                continue
            previous = self._last.get(pod)
            if previous is None:
                self._baseline[pod] = now
            else:
                interval = _increase(pod, *previous, now, sample)
                if interval is not None:
                    self._intervals.append(interval)
                    active = True
            self._last[pod] = (now, sample)
            active = active or sample.in_flight > 0
        if self._first is None:
            self._first = now
        if active:
            self._last_activity = now
        known = [self._last[p][1] for p in pods if p in self._last]
        self._observations.append(
            _Observation(
                time=now,
                present=frozenset(pods),
                failed=frozenset(p for p, s in pods.items() if s is None),
                held=held,
                in_flight=sum(s.in_flight for s in known),
                queued=sum(s.queued for s in known),
                saturated=sum(1 for s in known if s.queued > 0),
            )
        )
        self._forget(now)

    def load(self, stable_seconds: float, panic_seconds: float) -> FleetLoad:
        """Rates over the two windows and the fleet's gauges, as of the latest observation."""
        latest = self._latest
        if latest is None or self._first is None:
            return FleetLoad(None, None, {}, 0, 0, 0, 0, 0, 0, 0.0)
        stable = self._rate(latest, stable_seconds)
        panic = self._rate(latest, panic_seconds)
        return FleetLoad(
            stable_rate=None if stable is None else stable[0] + self._growth(stable_seconds),
            panic_rate=None if panic is None else panic[0] + self._growth(panic_seconds),
            by_adapter={} if stable is None else stable[1],
            in_flight=latest.in_flight,
            queued=latest.queued,
            saturated=latest.saturated,
            held=latest.held,
            pods=len(latest.present),
            answered=len(latest.present - latest.failed),
            idle_seconds=latest.time
            - (self._first if self._last_activity is None else self._last_activity),
        )

    def _rate(self, latest: _Observation, window: float) -> tuple[float, dict[str, float]] | None:
        """Requests per second (in all, per adapter) over the window that ends at `latest`."""
        assert self._first is not None
        end = latest.time
        start = max(end - window, self._first)
        if end <= start:
            return None
        per_pod: dict[str, float] = {}
        adapters: dict[str, float] = {}
        pod_adapters: dict[str, dict[str, float]] = {}
        # Intervals are appended as time goes on, so the newest end is at the right.
        for iv in reversed(self._intervals):
            if iv.end <= start:
                break
            share = (iv.end - max(iv.start, start)) / (iv.end - iv.start)
            per_pod[iv.pod] = per_pod.get(iv.pod, 0.0) + iv.requests * share
            mine = pod_adapters.setdefault(iv.pod, {})
            for adapter, n in iv.by_adapter.items():
                mine[adapter] = mine.get(adapter, 0.0) + n * share
        total = sum(per_pod.values())
        for pod_counts in pod_adapters.values():
            for adapter, n in pod_counts.items():
                adapters[adapter] = adapters.get(adapter, 0.0) + n
        # A pod still there whose latest scrape failed: its requests since its last good
        # sample are not known yet, so it counts at its own rate over what is known.
        for pod in latest.failed:
            if pod not in self._last:
                continue
            known_until = self._last[pod][0]
            known_from = max(start, self._baseline[pod])
            if known_until <= known_from:
                continue
            scale = (end - known_until) / (known_until - known_from)
            total += per_pod.get(pod, 0.0) * scale
            for adapter, n in pod_adapters.get(pod, {}).items():
                adapters[adapter] += n * scale
        span = end - start
        return total / span, {a: n / span for a, n in sorted(adapters.items())}

    def _growth(self, window: float) -> float:
        """How fast the requests waiting (queued or held) grew over the window, per second.

        Finished requests undercount arrivals by as much when the fleet cannot keep up. A
        shrinking backlog counts as 0, not less: the fleet is busy draining it.
        """
        latest = self._observations[-1]
        then = self._observations[0]
        for obs in reversed(self._observations):
            if obs.time <= latest.time - window:
                then = obs
                break
        if then.time >= latest.time:
            return 0.0
        return max(0.0, (latest.waiting - then.waiting) / (latest.time - then.time))

    def _forget(self, now: float) -> None:
        horizon = now - self.retention_seconds
        while self._intervals and self._intervals[0].end <= horizon:
            self._intervals.popleft()
        # The newest observation before the horizon stays: the base of a window that long.
        while len(self._observations) > 1 and self._observations[1].time <= horizon:
            self._observations.popleft()
        assert self._latest is not None
        gone = [p for p, (t, _) in self._last.items() if t <= horizon]
        for pod in gone:
            if pod not in self._latest.present:
                del self._last[pod]
                del self._baseline[pod]


def _increase(
    pod: str, then: float, before: PodSample, now: float, after: PodSample
) -> _Interval | None:
    """What a pod finished between two good samples; None when nothing."""
    restarted = after.requests < before.requests or (
        before.started is not None and after.started is not None and after.started != before.started
    )
    if restarted:
        # The process counted from zero since it restarted: all of its count is new.
        requests, by_adapter = after.requests, dict(after.by_adapter)
    else:
        requests = after.requests - before.requests
        by_adapter = {
            a: n - before.by_adapter.get(a, 0.0)
            for a, n in after.by_adapter.items()
            if n > before.by_adapter.get(a, 0.0)
        }
    if requests <= 0:
        return None
    return _Interval(pod, then, now, requests, by_adapter)
