"""Counters scraped from runtime pods into fleet request rates."""

from __future__ import annotations

import random

import pytest

from loraplane.operator.rates import MetricsError, PodSample, RateTracker, parse_metrics
from loraplane.runtime.metrics import Metrics


def scrape(metrics: Metrics) -> str:
    return metrics.render({"gpu": 1}).decode()


# ---- parsing --------------------------------------------------------------------------------


def test_parses_what_the_runtime_exports():
    m = Metrics()
    m.requests.labels(adapter="magicoder", status="ok").inc(7)
    m.requests.labels(adapter="magicoder", status="error").inc(2)
    m.requests.labels(adapter="base", status="rejected").inc(3)
    m.in_flight.set(5)
    m.queue_depth.set(2)
    sample = parse_metrics(scrape(m))
    assert sample.requests == 12
    assert dict(sample.by_adapter) == {"magicoder": 9, "base": 3}
    assert (sample.in_flight, sample.queued) == (5, 2)
    assert sample.started is not None


def test_a_runtime_that_served_nothing_is_a_sample_of_zero():
    sample = parse_metrics(scrape(Metrics()))
    assert sample == PodSample(requests=0, by_adapter={}, in_flight=0, queued=0, started=None)


def test_unknown_metrics_are_ignored():
    m = Metrics()
    m.requests.labels(adapter="a", status="ok").inc(4)
    text = (
        "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 12.5\n"
        + scrape(m)
        + '# TYPE someone_elses gauge\nsomeone_elses{loraplane_requests_total="x"} 99\n'
    )
    assert parse_metrics(text).requests == 4


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("<html><body>502 Bad Gateway</body></html>", "not Prometheus text format"),
        ("up 1\n", "no loraplane_requests_total, loraplane_requests_in_flight"),
        ("", "no loraplane_requests_total"),
        (
            "# TYPE loraplane_requests_total counter\nloraplane_requests_total 3\n",
            "no loraplane_requests_in_flight, loraplane_queue_depth",
        ),
    ],
)
def test_rejects_what_is_not_a_runtime(text, match):
    with pytest.raises(MetricsError, match=match):
        parse_metrics(text)


@pytest.mark.parametrize("value", ["-1", "NaN", "+Inf"])
def test_rejects_impossible_counts(value):
    text = scrape(Metrics()).replace("loraplane_queue_depth 0.0", f"loraplane_queue_depth {value}")
    with pytest.raises(MetricsError, match="finite and non-negative"):
        parse_metrics(text)


# ---- the tracker ------------------------------------------------------------------------------


def s(requests: float, **kw) -> PodSample:
    return PodSample(requests=requests, **kw)


def feed(tracker: RateTracker, rounds: list[tuple[float, dict[str, PodSample | None]]]):
    for now, pods in rounds:
        tracker.observe(now, pods)


def steady(tracker: RateTracker, pods: dict[str, float], seconds: int, tick: int = 2, t0: int = 0):
    """Each pod finishing `rate` requests a second, scraped every tick from t0 on."""
    for k in range(seconds // tick + 1):
        t = t0 + k * tick
        tracker.observe(t, {p: s(rate * t) for p, rate in pods.items()})


def test_no_rate_before_two_observations():
    tracker = RateTracker()
    assert not tracker.load(60, 6).measured
    tracker.observe(0, {"a": s(100)})
    load = tracker.load(60, 6)
    assert (load.stable_rate, load.panic_rate, load.measured) == (None, None, False)


def test_steady_rate_over_both_windows():
    tracker = RateTracker()
    steady(tracker, {"a": 3.0, "b": 2.0}, seconds=120)
    load = tracker.load(60, 6)
    assert load.stable_rate == pytest.approx(5.0)
    assert load.panic_rate == pytest.approx(5.0)
    assert (load.pods, load.answered) == (2, 2)


def test_window_shorter_than_the_scrape_interval_takes_a_share_of_the_last_one():
    tracker = RateTracker()
    feed(tracker, [(0, {"a": s(0)}), (10, {"a": s(100)}), (20, {"a": s(300)})])
    load = tracker.load(60, 6)
    assert load.panic_rate == pytest.approx(20.0)  # 6 s of the last 10 s interval
    assert load.stable_rate == pytest.approx(15.0)  # only 20 s of history so far


def test_rate_over_the_window_only():
    tracker = RateTracker()
    steady(tracker, {"a": 10.0}, seconds=100)
    tracker.observe(102, {"a": s(1000)})  # nothing more from 100 to 160
    for t in range(104, 161, 2):
        tracker.observe(t, {"a": s(1000)})
    load = tracker.load(60, 6)
    assert load.stable_rate == pytest.approx(0.0)
    tracker.observe(162, {"a": s(1060)})
    assert tracker.load(60, 6).panic_rate == pytest.approx(60 / 6)


def test_a_new_pod_is_only_a_baseline():
    tracker = RateTracker()
    steady(tracker, {"a": 5.0}, seconds=60)
    # Seen for the first time with a large counter: an operator restart or a late pod.
    tracker.observe(62, {"a": s(310), "b": s(1_000_000)})
    assert tracker.load(60, 6).stable_rate == pytest.approx(5.0)
    tracker.observe(64, {"a": s(320), "b": s(1_000_010)})
    load = tracker.load(60, 6)
    # b's 10 requests since its baseline join a's 30 in the last 6 s.
    assert load.panic_rate == pytest.approx((30 + 10) / 6)


def test_counter_drop_is_a_restart_and_the_new_value_counts():
    tracker = RateTracker()
    feed(tracker, [(0, {"a": s(0)}), (10, {"a": s(1000)}), (20, {"a": s(40)})])
    load = tracker.load(10, 6)
    assert load.stable_rate == pytest.approx(4.0)  # 40 since the restart, never negative


def test_restart_seen_through_the_creation_time_even_when_the_counter_rose():
    tracker = RateTracker()
    feed(
        tracker,
        [
            (0, {"a": s(0, started=1000.0)}),
            (10, {"a": s(30, started=1000.0)}),
            (20, {"a": s(50, started=1015.0)}),  # restarted, then 50 new requests
        ],
    )
    assert tracker.load(10, 6).stable_rate == pytest.approx(5.0)  # not (50 - 30) / 10


def test_a_pod_that_goes_keeps_its_past_requests_in_the_window():
    tracker = RateTracker()
    steady(tracker, {"a": 5.0, "b": 5.0}, seconds=60)
    tracker.observe(62, {"a": s(310)})  # b is gone: scaled down
    load = tracker.load(60, 6)
    # b's last interval ended at 60; the window 2..62 still holds its 58 s of requests.
    assert load.stable_rate == pytest.approx((5 * 60 + 5 * 58) / 60)
    assert (load.pods, load.answered) == (1, 1)
    for t in range(64, 200, 2):
        tracker.observe(t, {"a": s(5 * t)})
    assert tracker.load(60, 6).stable_rate == pytest.approx(5.0)


def test_a_failed_scrape_is_not_zero():
    tracker = RateTracker()
    steady(tracker, {"a": 5.0, "b": 5.0}, seconds=60)
    tracker.observe(62, {"a": s(310), "b": None})
    load = tracker.load(60, 6)
    assert load.stable_rate == pytest.approx(10.0)
    assert load.panic_rate == pytest.approx(10.0)
    assert (load.pods, load.answered) == (2, 1)
    # The next good sample covers the gap once: no double count, no dip.
    tracker.observe(64, {"a": s(320), "b": s(320)})
    assert tracker.load(60, 6).stable_rate == pytest.approx(10.0)


def test_a_pod_whose_scrape_failed_counts_at_its_rate_and_a_gone_one_does_not():
    with_failure, gone = RateTracker(), RateTracker()
    for tracker in (with_failure, gone):
        steady(tracker, {"a": 5.0, "b": 5.0}, seconds=60)
    with_failure.observe(62, {"a": s(310), "b": None})
    gone.observe(62, {"a": s(310)})
    assert with_failure.load(60, 6).panic_rate == pytest.approx(10.0)
    assert gone.load(60, 6).panic_rate == pytest.approx((30 + 20) / 6)  # b until 60 only


def test_all_scrapes_failing_is_no_measurement():
    tracker = RateTracker()
    steady(tracker, {"a": 5.0}, seconds=60)
    tracker.observe(62, {"a": None})
    load = tracker.load(60, 6)
    assert not load.measured
    assert load.stable_rate == pytest.approx(5.0)  # the rate is still known, for status


def test_no_pods_is_a_measured_zero():
    tracker = RateTracker()
    for t in range(0, 20, 2):
        tracker.observe(t, {})
    load = tracker.load(60, 6)
    assert load.measured
    assert (load.stable_rate, load.pods) == (0.0, 0)


def test_a_pod_back_within_retention_is_continuous_and_later_a_new_baseline():
    tracker = RateTracker(retention_seconds=100)
    feed(tracker, [(0, {"a": s(0)}), (10, {"a": s(50)}), (20, {})])
    tracker.observe(30, {"a": s(150)})  # back: 100 requests since t=10
    assert tracker.load(20, 6).stable_rate == pytest.approx(100 / 20)
    for t in range(40, 200, 10):
        tracker.observe(t, {})
    tracker.observe(200, {"a": s(9000)})  # forgotten: a baseline, not 8850 requests
    tracker.observe(210, {"a": s(9010)})
    assert tracker.load(20, 6).stable_rate == pytest.approx(10 / 20)


def test_gauges_and_saturation_come_from_the_latest_known_samples():
    tracker = RateTracker()
    tracker.observe(0, {"a": s(0), "b": s(0), "c": s(0)}, held=0)
    tracker.observe(
        2,
        {"a": s(1, in_flight=8, queued=3), "b": None, "c": s(2, in_flight=1)},
        held=4,
    )
    load = tracker.load(60, 6)
    assert (load.in_flight, load.queued, load.saturated, load.held) == (9, 3, 1, 4)
    assert load.waiting == 7


def test_a_growing_backlog_is_arriving_demand():
    # The pod finishes 10 requests a second at most; 30 arrive, so its queue grows by 20.
    tracker = RateTracker()
    for t in range(0, 121, 2):
        tracker.observe(t, {"a": s(10 * t, in_flight=20 * t + 5, queued=20 * t)})
    load = tracker.load(60, 6)
    assert load.stable_rate == pytest.approx(30.0)
    assert load.panic_rate == pytest.approx(30.0)
    # Held by the router at zero: the same.
    tracker = RateTracker()
    for t in range(0, 61, 2):
        tracker.observe(t, {}, held=3 * t)
    assert tracker.load(60, 6).stable_rate == pytest.approx(3.0)


def test_a_draining_backlog_does_not_lower_the_rate():
    tracker = RateTracker()
    for t in range(0, 121, 2):
        tracker.observe(t, {"a": s(10 * t, queued=max(0, 1000 - 5 * t))})
    assert tracker.load(60, 6).stable_rate == pytest.approx(10.0)


def test_rates_per_adapter():
    tracker = RateTracker()
    for t in range(0, 61, 2):
        tracker.observe(
            t,
            {
                "a": s(3 * t, by_adapter={"x": 2 * t, "y": t}),
                "b": s(t, by_adapter={"y": t}),
            },
        )
    assert tracker.load(60, 6).by_adapter == pytest.approx({"x": 2.0, "y": 2.0})


def test_idle_time_counts_from_the_last_request():
    tracker = RateTracker()
    tracker.observe(0, {"a": s(500)})  # a baseline is not a request
    tracker.observe(10, {"a": s(500)})
    assert tracker.load(60, 6).idle_seconds == 10
    tracker.observe(20, {"a": s(501)})
    tracker.observe(30, {"a": s(501, in_flight=1)})
    tracker.observe(40, {"a": s(502)})
    tracker.observe(100, {"a": s(502)})
    assert tracker.load(60, 6).idle_seconds == 60
    tracker.observe(110, {}, held=1)
    assert tracker.load(60, 6).idle_seconds == 0


def test_time_must_move_forward():
    tracker = RateTracker()
    tracker.observe(5, {})
    with pytest.raises(ValueError, match="monotonic"):
        tracker.observe(5, {})


@pytest.mark.parametrize("seed", range(20))
def test_against_brute_force_with_failures_and_restarts(seed):
    """Pods at constant rates, scraped at uneven times with failures and restarts: the rate
    over any window is exactly the sum of the pods' rates (restarts happen right after a
    good sample, so no request is lost in them)."""
    rng = random.Random(seed)
    rates = {f"pod-{i}": rng.uniform(0, 20) for i in range(rng.randint(1, 6))}
    offset = {p: rng.uniform(0, 1e6) for p in rates}  # counters already running
    started = dict.fromkeys(rates, 1.0)
    last_good: dict[str, float] = {}
    tracker = RateTracker()
    now = end = 0.0
    for _ in range(rng.randint(5, 80)):
        end = now
        pods: dict[str, PodSample | None] = {}
        for p, rate in rates.items():
            if now > 0 and rng.random() < 0.3:  # every pod's baseline at 0
                pods[p] = None
                continue
            if p in last_good and rng.random() < 0.1:  # restarted right after its last sample
                offset[p] = -rate * last_good[p]
                started[p] += 1
            pods[p] = s(offset[p] + rate * now, started=started[p])
            last_good[p] = now
        tracker.observe(now, pods)
        now += rng.uniform(0.5, 8)
    window = rng.uniform(1, 120)
    load = tracker.load(window, min(window, rng.uniform(1, 10)))
    if load.stable_rate is None:
        return
    # A pod without a good sample inside the window has no known rate there: it counts 0.
    start = max(end - window, 0.0)
    expected = sum(rate for p, rate in rates.items() if last_good[p] > start)
    assert load.stable_rate == pytest.approx(expected, rel=1e-9, abs=1e-12)
