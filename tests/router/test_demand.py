"""The operator reads held demand from the routers' real /metrics text."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from loraplane.api.wire import ROUTER_METRICS_PORT
from loraplane.operator.demand import (
    RouterMetricsError,
    RouterSample,
    RouterTarget,
    held_requests,
    parse_router_metrics,
    router_targets,
)
from loraplane.router.metrics import RouterMetrics


def test_held_and_answered_requests_from_a_routers_registry() -> None:
    m = RouterMetrics()
    empty = parse_router_metrics(generate_latest(m.registry).decode())
    assert empty == RouterSample(held=0)  # a router that never held anything is still one

    m.set_held("sql", 3)
    m.set_held("tiny", 1)
    m.set_held("poet", 0)
    m.requests.labels(adapter="sql", code="200").inc(5)
    m.requests.labels(adapter="sql", code="503").inc()
    sample = parse_router_metrics(generate_latest(m.registry).decode())
    assert sample.held == 4 and sample.held_by_adapter == {"sql": 3, "tiny": 1}
    assert sample.requests_by_adapter == {"sql": 6.0}


def test_held_requests_sum_over_routers_and_skip_failed_scrapes() -> None:
    assert held_requests([RouterSample(2), None, RouterSample(3)]) == 5
    assert held_requests([]) == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("loraplane_requests_total 3\n", "no loraplane_router_held_requests"),
        ("this is { not prometheus", "not Prometheus text"),
        (
            "# TYPE loraplane_router_held_requests gauge\n"
            'loraplane_router_held_requests{adapter="a"} -1\n',
            "finite and >= 0",
        ),
    ],
)
def test_what_is_not_a_routers_metrics_is_refused(text: str, message: str) -> None:
    with pytest.raises(RouterMetricsError, match=message):
        parse_router_metrics(text)


def test_router_targets_are_every_router_pod_with_an_address() -> None:
    pods = [
        {"metadata": {"name": "r2"}, "status": {"podIP": "10.0.0.2"}},
        {"metadata": {"name": "r1", "deletionTimestamp": "x"}, "status": {"podIP": "10.0.0.1"}},
        {"metadata": {"name": "r3"}, "status": {}},  # not started: nothing to scrape
    ]
    assert router_targets(pods) == [RouterTarget("r1", "10.0.0.1"), RouterTarget("r2", "10.0.0.2")]
    assert RouterTarget("r", "ip").port == ROUTER_METRICS_PORT
