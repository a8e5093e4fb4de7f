"""The autoscaling decision, alone and driven through a RateTracker by a simulated fleet."""

from __future__ import annotations

import itertools
import math
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loraplane.api import AutoscalingSpec
from loraplane.operator.autoscaler import Decision, ScaleReason, ScaleState, decide
from loraplane.operator.rates import FleetLoad, PodSample, RateTracker

R = ScaleReason


def spec(**kw) -> AutoscalingSpec:
    values = {
        "enabled": True,
        "min_replicas": 1,
        "max_replicas": 10,
        "target_requests_per_second": "5",
        "scale_down_stabilization_seconds": 0,
    } | kw
    return AutoscalingSpec(**values)


def load(stable: float | None, panic: float | None = None, **kw) -> FleetLoad:
    values = {
        "stable_rate": stable,
        "panic_rate": stable if panic is None else panic,
        "by_adapter": {},
        "in_flight": 0,
        "queued": 0,
        "saturated": 0,
        "held": 0,
        "pods": 1,
        "answered": 1,
        "idle_seconds": 0.0,
    } | kw
    return FleetLoad(**values)


# ---- one decision -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "rate", "desired"),
    [
        ("5", 20.0, 4),
        ("5", 20.001, 5),
        ("5", 0.1, 1),
        ("2.5", 10.0, 4),
        ("2500m", 10.0, 4),
        ("0.1", 0.1 + 0.2, 3),  # 0.30000000000000004 is 300 milli: not 4 replicas
        ("0.001", 0.002, 2),
        ("3", 9.0, 3),
    ],
)
def test_desired_is_the_ceiling_of_rate_over_target_in_exact_decimals(target, rate, desired):
    d = decide(spec(target_requests_per_second=target, max_replicas=100), 1, load(rate), None, 0)
    assert d.recommended == desired


def test_steady_load_is_stable():
    d = decide(spec(), 4, load(20.0), None, 0)
    assert (d.desired, d.reason) == (4, R.STABLE)
    assert "20.00 req/s over 60s" in d.message
    assert "target 5 per replica" in d.message


def test_bounds_and_their_reasons():
    d = decide(spec(max_replicas=4), 2, load(50.0, panic=15.0), None, 0)
    assert (d.desired, d.reason, d.recommended) == (4, R.AT_MAX_REPLICAS, 10)
    assert "maxReplicas is 4" in d.message
    d = decide(spec(min_replicas=2), 2, load(1.0), None, 0)
    assert (d.desired, d.reason) == (2, R.AT_MIN_REPLICAS)
    assert "minReplicas is 2" in d.message


def test_bounds_changed_by_the_user_apply_at_once():
    assert decide(spec(max_replicas=3), 6, load(30.0), None, 0).desired == 3
    assert decide(spec(min_replicas=5), 2, load(1.0), None, 0).desired == 5


def test_no_metrics_keeps_the_count_and_says_why():
    d = decide(spec(), 3, load(7.0, pods=3, answered=0), None, 0)
    assert (d.desired, d.reason) == (3, R.NO_METRICS)
    assert "no pod answered /metrics (0 of 3)" in d.message
    d = decide(spec(), 3, load(None), None, 0)
    assert (d.desired, d.reason) == (3, R.NO_METRICS)
    assert "baseline" in d.message


def test_no_metrics_still_honours_bounds_and_held_requests():
    assert decide(spec(max_replicas=2), 3, load(None), None, 0).desired == 2
    d = decide(spec(min_replicas=0), 0, load(None, held=2, pods=0, answered=0), None, 0)
    assert (d.desired, d.reason) == (1, R.NO_METRICS)
    assert "2 requests held" in d.message


def test_a_saturated_pod_counts_as_at_least_its_target():
    # Long generations: few requests finish, yet every pod has a queue.
    d = decide(spec(), 3, load(2.0, saturated=3, queued=12), None, 0)
    assert d.desired == 4  # 3 x 5 req/s, plus 12 waiting over the 60 s window
    assert d.reason is R.SCALED_UP
    assert "12 queued in 3 saturated pods" in d.message


def test_a_pod_without_a_queue_is_not_saturated():
    assert decide(spec(), 3, load(2.0, in_flight=30), None, 0).desired == 1


def test_a_negative_count_is_refused():
    with pytest.raises(ValueError, match="negative"):
        decide(spec(), -1, load(1.0), None, 0)


# ---- panic ------------------------------------------------------------------------------------


def test_panic_scales_up_at_once_past_the_threshold():
    s = spec(scale_up_stabilization_seconds=120)
    d = decide(s, 2, load(10.0, panic=20.0), None, 0)  # exactly 200% of 2 x 5
    assert (d.desired, d.reason, d.panic) == (4, R.PANIC, True)
    assert "panic: the 6s rate passed 200%" in d.message


def test_below_the_threshold_there_is_no_panic():
    d = decide(spec(scale_up_stabilization_seconds=120), 2, load(19.0, panic=19.99), None, 0)
    assert (d.desired, d.panic, d.recommended) == (2, False, 4)
    assert d.reason is R.SCALE_UP_STABILIZED  # the seed recommendation of 2 is the lowest


def test_panic_holds_until_a_stable_window_after_the_burst():
    s = spec(stable_window_seconds=60)
    d = decide(s, 1, load(5.0, panic=40.0), None, 0)
    assert d.desired == 8
    state = d.state
    for t in (2, 30, 59):
        d = decide(s, 8, load(5.0, panic=5.0), state, t)
        assert (d.desired, d.reason) == (8, R.PANIC)
        state = d.state
    d = decide(s, 8, load(5.0, panic=5.0), state, 60)
    assert (d.panic, d.desired, d.reason) == (False, 1, R.SCALED_DOWN)


def test_a_burst_during_panic_extends_it_and_still_scales_up():
    s = spec(stable_window_seconds=60)
    state = decide(s, 1, load(5.0, panic=40.0), None, 0).state
    d = decide(s, 8, load(5.0, panic=90.0), state, 50)  # 225% of 8 x 5
    assert (d.desired, d.reason, d.panic) == (10, R.PANIC, True)
    assert "maxReplicas is 10" in d.message
    d = decide(s, 10, load(5.0, panic=5.0), d.state, 100)
    assert (d.desired, d.panic) == (10, True)  # 50 s after the last burst


# ---- stabilization ----------------------------------------------------------------------------


def test_scale_down_waits_for_the_highest_recent_recommendation():
    s = spec(scale_down_stabilization_seconds=300)
    state = ScaleState()
    d = decide(s, 6, load(30.0), state, 0)
    state = d.state
    for t in range(10, 300, 10):
        d = decide(s, 6, load(10.0), state, t)
        assert (d.desired, d.reason) == (6, R.SCALE_DOWN_STABILIZED), t
        assert "the highest recommendation of the last 300s is 6" in d.message
        state = d.state
    d = decide(s, 6, load(10.0), state, 301)
    assert (d.desired, d.reason) == (2, R.SCALED_DOWN)


def test_scale_up_goes_only_to_the_lowest_recent_recommendation():
    s = spec(scale_up_stabilization_seconds=30)
    state = decide(s, 2, load(10.0), ScaleState(), 0).state
    d = decide(s, 2, load(19.0), state, 10)  # wants 4; below the panic threshold
    assert (d.desired, d.reason) == (2, R.SCALE_UP_STABILIZED)
    d = decide(s, 2, load(15.0), d.state, 20)  # wants 3
    d = decide(s, 2, load(19.0), d.state, 31)  # window 1..31 holds 4 and 3
    assert (d.desired, d.reason) == (3, R.SCALED_UP)
    assert "lowest recommendation of the last 30s is 3" in d.message


def test_a_restarted_operator_does_not_scale_down_at_once():
    s = spec(scale_down_stabilization_seconds=300)
    d = decide(s, 5, load(1.0), None, 1000)
    assert (d.desired, d.reason) == (5, R.SCALE_DOWN_STABILIZED)
    assert decide(s, 5, load(1.0), d.state, 1301).desired == 1


# ---- zero -------------------------------------------------------------------------------------


def test_scale_to_zero_only_after_the_idle_period():
    s = spec(min_replicas=0, scale_to_zero_idle_seconds=900)
    d = decide(s, 1, load(0.0, idle_seconds=899.9), None, 0)
    assert (d.desired, d.reason) == (1, R.STABLE)
    assert "zero after 900s without requests (idle 900s)" in d.message
    d = decide(s, 1, load(0.0, idle_seconds=900), d.state, 1)
    assert (d.desired, d.reason) == (0, R.SCALED_TO_ZERO)
    assert "no requests for 900s" in d.message


def test_never_zero_with_min_replicas():
    d = decide(spec(min_replicas=1), 1, load(0.0, idle_seconds=10**6), None, 0)
    assert d.desired == 1


@pytest.mark.parametrize("busy", [{"held": 1}, {"in_flight": 1}])
def test_never_zero_while_requests_wait_or_run(busy):
    s = spec(min_replicas=0, scale_to_zero_idle_seconds=30)
    d = decide(s, 1, load(0.0, idle_seconds=3600, **busy), None, 0)
    assert d.desired == 1


def test_held_requests_wake_a_fleet_at_zero_at_once():
    s = spec(min_replicas=0, scale_up_stabilization_seconds=600)
    d = decide(s, 0, load(0.0, held=3, pods=0, answered=0), ScaleState(), 0)
    assert (d.desired, d.reason) == (1, R.SCALED_FROM_ZERO)
    assert "3 held by the router" in d.message


def test_at_zero_without_requests_stays_at_zero_even_after_a_restart():
    s = spec(min_replicas=0)
    d = decide(s, 0, load(0.0, pods=0, answered=0, idle_seconds=2), None, 0)
    assert (d.desired, d.reason) == (0, R.SCALED_TO_ZERO)
    assert "at zero" in d.message


# ---- a simulated fleet through the RateTracker ------------------------------------------------


@dataclass
class Fleet:
    """Pods that start when asked for and, once scraped (a baseline of 0), share the load
    evenly; scraped every tick, each decision applied at once."""

    spec: AutoscalingSpec
    replicas: int = 1
    tick: float = 2.0
    tracker: RateTracker = field(default_factory=RateTracker)
    counters: dict[str, float] = field(default_factory=dict)
    serving: set[str] = field(default_factory=set)
    state: ScaleState | None = None
    next_pod: int = 0
    decisions: list[Decision] = field(default_factory=list)

    def run(
        self,
        rate: Callable[[float], float],
        seconds: float,
        t0: float = 0.0,
        fail: Callable[[float, str], bool] = lambda t, p: False,
        held: Callable[[float], int] = lambda t: 0,
    ) -> list[Decision]:
        start = len(self.decisions)
        for k in range(round(seconds / self.tick)):
            now = t0 + k * self.tick
            self.resize()
            serving = [p for p in self.counters if p in self.serving]
            for pod in serving:
                self.counters[pod] += rate(now) * self.tick / len(serving)
            samples = {p: None if fail(now, p) else PodSample(n) for p, n in self.counters.items()}
            self.serving |= {p for p, sample in samples.items() if sample is not None}
            self.tracker.observe(now, samples, held=held(now))
            fleet_load = self.tracker.load(
                self.spec.stable_window_seconds, self.spec.panic_window_seconds
            )
            d = decide(self.spec, self.replicas, fleet_load, self.state, now)
            self.state, self.replicas = d.state, d.desired
            self.decisions.append(d)
        return self.decisions[start:]

    def resize(self) -> None:
        while len(self.counters) < self.replicas:
            self.counters[f"pod-{self.next_pod:04d}"] = 0.0
            self.next_pod += 1
        while len(self.counters) > self.replicas:
            del self.counters[max(self.counters)]


def changes(decisions: list[Decision]) -> int:
    return sum(1 for a, b in itertools.pairwise(decisions) if a.desired != b.desired)


def test_fleet_steady_load_settles_and_stays():
    fleet = Fleet(spec(scale_down_stabilization_seconds=300))
    ds = fleet.run(lambda t: 23.0, seconds=1200)
    assert ds[-1].desired == 5
    assert all(d.desired == 5 for d in ds[-500:])
    assert ds[-1].reason is R.STABLE


def test_fleet_follows_a_ramp_without_overshoot():
    fleet = Fleet(spec(max_replicas=20, scale_down_stabilization_seconds=300))
    ds = fleet.run(lambda t: t / 10, seconds=600)  # 0 -> 60 req/s over 10 minutes
    desired = [d.desired for d in ds]
    assert desired == sorted(desired)  # only up
    assert desired[-1] == 12
    # Never more than the instant rate asks for: a ramp is no burst.
    assert all(d <= max(1, math.ceil((k * 2.0 / 10) / 5)) for k, d in enumerate(desired))


def test_fleet_burst_panics_then_holds_then_comes_down():
    s = spec(max_replicas=20, stable_window_seconds=60, scale_down_stabilization_seconds=0)
    fleet = Fleet(s)
    fleet.run(lambda t: 5.0, seconds=120)
    assert fleet.replicas == 1
    burst = fleet.run(lambda t: 50.0, seconds=8, t0=120)
    # Within the panic window (6 s), not after the stable window caught up.
    assert burst[-1].desired == 10
    assert any(d.reason is R.PANIC for d in burst)
    after = fleet.run(lambda t: 5.0, seconds=240, t0=128)
    held = [d for d in after if d.panic]
    assert held and all(d.desired == 10 for d in held)
    assert after[-1].desired == 1


def test_fleet_flapping_load_does_not_oscillate():
    s = spec(max_replicas=20, scale_down_stabilization_seconds=300)
    fleet = Fleet(s)
    ds = fleet.run(lambda t: 30.0 if (t // 30) % 2 else 10.0, seconds=1800)
    # Up in the first burst, down once the 300 s window has passed, then still.
    desired = [d.desired for d in ds]
    peak = desired.index(max(desired))
    assert desired[: peak + 1] == sorted(desired[: peak + 1])
    assert desired[peak:] == sorted(desired[peak:], reverse=True)
    assert changes(ds[200:]) == 0
    assert ds[-1].desired == 4  # the 20 req/s average


def test_fleet_flapping_load_without_stabilization_would_oscillate():
    # The control for the test above: the same load with no scale-down window does flap.
    fleet = Fleet(
        spec(max_replicas=20, scale_down_stabilization_seconds=0, stable_window_seconds=6)
    )
    ds = fleet.run(lambda t: 30.0 if (t // 30) % 2 else 10.0, seconds=1800)
    assert changes(ds[100:]) > 20


def test_fleet_counter_reset_changes_nothing():
    fleet = Fleet(spec(scale_down_stabilization_seconds=300))
    fleet.run(lambda t: 20.0, seconds=600)
    assert fleet.replicas == 4
    fleet.counters["pod-0002"] = 0.0  # the runtime in that pod restarted
    ds = fleet.run(lambda t: 20.0, seconds=120, t0=600)
    assert all(d.desired == 4 for d in ds)
    assert all(d.message.startswith("4 replicas") for d in ds)


def test_fleet_pod_vanishing_mid_window_is_no_dip():
    fleet = Fleet(spec(scale_down_stabilization_seconds=0))
    fleet.run(lambda t: 20.0, seconds=600)
    del fleet.counters["pod-0001"]  # evicted; the Deployment replaces it with a new pod
    ds = fleet.run(lambda t: 20.0, seconds=120, t0=600)
    assert all(d.desired == 4 for d in ds)
    rates = [fleet.tracker.load(60, 6).stable_rate]
    assert rates[0] == pytest.approx(20.0)


def test_fleet_failed_scrapes_keep_the_count():
    fleet = Fleet(spec(scale_down_stabilization_seconds=0))
    fleet.run(lambda t: 20.0, seconds=600)
    # One pod misses every other scrape; then all scrapes fail for a while.
    ds = fleet.run(
        lambda t: 20.0, seconds=60, t0=600, fail=lambda t, p: p == "pod-0000" and t % 4 == 0
    )
    assert all(d.desired == 4 for d in ds)
    ds = fleet.run(lambda t: 20.0, seconds=30, t0=660, fail=lambda t, p: True)
    assert all((d.desired, d.reason) == (4, R.NO_METRICS) for d in ds)
    ds = fleet.run(lambda t: 20.0, seconds=60, t0=690)
    assert all(d.desired == 4 for d in ds)


def test_fleet_silence_goes_to_zero_after_the_idle_period_and_not_before():
    s = spec(min_replicas=0, scale_to_zero_idle_seconds=300, scale_down_stabilization_seconds=60)
    fleet = Fleet(s)
    fleet.run(lambda t: 12.0, seconds=300)
    assert fleet.replicas == 3
    quiet = fleet.run(lambda t: 0.0, seconds=400, t0=300)
    # The scrape at 298 saw the last requests: zero 300 s later.
    at_zero = [k for k, d in enumerate(quiet) if d.desired == 0]
    first_zero = 300 + at_zero[0] * fleet.tick
    assert first_zero == 598
    assert all(d.desired == 0 for d in quiet[at_zero[0] :])
    assert all(d.desired >= 1 for d in quiet[: at_zero[0]])


def test_fleet_held_demand_wakes_from_zero_and_rate_takes_over():
    s = spec(min_replicas=0, scale_to_zero_idle_seconds=60)
    fleet = Fleet(s, replicas=0)
    ds = fleet.run(lambda t: 0.0, seconds=100)
    assert all(d.desired == 0 for d in ds)
    # The router holds requests while no pod exists; then traffic flows to the new pod.
    ds = fleet.run(lambda t: 0.0, seconds=2, t0=100, held=lambda t: 4)
    assert (ds[-1].desired, ds[-1].reason) == (1, R.SCALED_FROM_ZERO)
    ds = fleet.run(lambda t: 14.0, seconds=120, t0=102)
    assert ds[-1].desired == 3


# ---- invariants over random loads --------------------------------------------------------------


@pytest.mark.parametrize("seed", range(30))
def test_invariants_over_random_loads(seed):
    rng = random.Random(seed)
    s = spec(
        min_replicas=rng.choice([0, 0, 1, 3]),
        max_replicas=rng.choice([3, 8, 40]),
        target_requests_per_second=rng.choice(["1", "2.5", "7"]),
        stable_window_seconds=rng.choice([30, 60]),
        panic_window_seconds=rng.choice([6, 12]),
        scale_up_stabilization_seconds=rng.choice([0, 20]),
        scale_down_stabilization_seconds=rng.choice([0, 60, 300]),
        scale_to_zero_idle_seconds=rng.choice([30, 120]),
    )
    current, state, now = rng.randint(0, 5), None, 0.0
    lo = max(s.min_replicas, 1)
    history: list[tuple[float, int]] = [(1.0, current)]  # what a first decision assumes

    def window(seconds: int) -> list[int]:
        """The recommendations of the last `seconds`, the one made now included."""
        *older, (_, newest) = history
        return [*(r for t, r in older if now - t < seconds), newest]

    for _ in range(300):
        now += rng.choice([1.0, 2.0, 5.0])
        rate = rng.choice([0.0, 0.0, rng.uniform(0, 5), rng.uniform(0, 100)])
        fl = load(
            rate,
            panic=rate * rng.choice([1, 1, 3]),
            held=rng.choice([0, 0, 0, 2]),
            idle_seconds=0.0 if rate else rng.uniform(0, 200),
            answered=rng.choice([1, 1, 1, 0]),
        )
        d = decide(s, current, fl, state, now)
        assert d.reason in ScaleReason
        if d.desired == 0:
            assert s.min_replicas == 0 and fl.held == 0
            assert d.reason is R.SCALED_TO_ZERO or (d.reason is R.NO_METRICS and current == 0)
        elif fl.measured:
            assert lo <= d.desired <= s.max_replicas
        if fl.held:
            assert d.desired >= 1
        if fl.measured and d.desired > 0:
            bounded = min(max(d.recommended, lo), s.max_replicas)
            history.append((now, bounded))
            if 0 < d.desired < min(current, s.max_replicas):
                # Down, never in panic, and never below a recommendation of the down window.
                assert not d.panic
                assert d.desired >= max(window(s.scale_down_stabilization_seconds))
            if lo <= current < d.desired and not d.panic:
                # Up only as far as every recommendation of the up window.
                assert d.desired <= min(window(s.scale_up_stabilization_seconds))
        if d.desired == 0:
            history = []
        state, current = d.state, d.desired


# ---- the simulation benchmark drives this same code ----------------------------------------------


def test_bench_quick_run_favours_one_consolidated_deployment(tmp_path):
    bench = Path(__file__).resolve().parents[2] / "bench" / "autoscale.py"
    run = subprocess.run(
        [sys.executable, str(bench), "--quick", "--jobs", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in run.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| setup") and "models" not in line
    }
    consolidated, dedicated, dedicated_zero = (float(rows["10"][i]) for i in (0, 2, 4))
    assert consolidated < dedicated_zero <= dedicated
    assert set(rows) >= {"consolidated", "dedicated", "dedicated-zero", "1", "5", "10"}
