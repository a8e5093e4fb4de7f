"""The Grafana dashboard queries only metrics the runtime, the router or the operator really
export, shows what issue 11 asks of it, and ships in the chart only when asked for."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from e2e.cluster import chart
from prometheus_client import CollectorRegistry

from loraplane.operator.metrics import OperatorMetrics
from loraplane.router.metrics import RouterMetrics

DASHBOARD = chart.CHART / "dashboards" / "loraplane.json"

# The samples each metric type exports (Prometheus' text format, as prometheus_client writes it).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}
PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "inf", "nan",
}  # fmt: skip
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def sample_names(registry: CollectorRegistry) -> set[str]:
    names = set()
    for family in registry.collect():
        names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    from loraplane.runtime.metrics import Metrics  # the runtime package needs torch

    return {
        "runtime": sample_names(Metrics().registry),
        "router": sample_names(RouterMetrics().registry),
        "operator": sample_names(OperatorMetrics().registry),
    }


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a Grafana label_values(...) query): every
    identifier that is not a function, a keyword, a label, a duration or a variable."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings, which may hold anything
    expr = re.sub(r"\$\{[^}]*\}|\$\w+", "", expr)  # Grafana variables ($__rate_interval)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery windows
    expr = GROUPING.sub("", expr)  # label lists of by (...), on (...)
    label_values = re.match(r"\s*label_values\((.*),\s*\w+\s*\)\s*$", expr)
    if label_values:  # label_values(metric{...}, label): the last argument is a label
        expr = label_values.group(1)
    names = set()
    for m in IDENTIFIER.finditer(expr):
        word, rest = m.group(), expr[m.end() :].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_KEYWORDS:
            continue  # a function call, or a keyword
        if expr[m.start() - 1 : m.start()].isdigit():
            continue  # the unit of a number: 5m, 1e3
        names.add(word)
    return names


def test_metric_names_finds_names_and_nothing_else() -> None:
    q = (
        'histogram_quantile(0.95, sum by (adapter, le) (rate(loraplane_x_bucket{a=~"$a",'
        ' b!="sum(y)"}[$__rate_interval]))) / on (pod) group_left max(up offset 5m) and bool 1'
    )
    assert metric_names(q) == {"loraplane_x_bucket", "up"}
    assert metric_names('label_values(loraplane_y{ns=~"$ns"}, adapter)') == {"loraplane_y"}
    assert metric_names("label_values(loraplane_y, adapter)") == {"loraplane_y"}


def queries(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(where, expression) of every query: panels' targets (rows' nested panels too) and the
    templating variables'."""

    def panels(items: list[dict]) -> Iterator[dict]:
        for p in items:
            yield p
            yield from panels(p.get("panels") or [])

    for p in panels(dashboard["panels"]):
        for t in p.get("targets") or []:
            yield f"panel {p['title']!r} {t['refId']}", t["expr"]
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            yield f"variable {v['name']}", q["query"] if isinstance(q, dict) else q


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_every_queried_metric_is_exported(exported: dict[str, set[str]]) -> None:
    everything = set().union(*exported.values())
    used: dict[str, set[str]] = {}
    for where, expr in queries(load()):
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        for name in names:
            used.setdefault(name, set()).add(where)
    unknown = {n: sorted(w) for n, w in used.items() if n not in everything}
    assert not unknown, f"queried but exported by no component: {unknown}"
    for component, names in exported.items():  # each component's metrics are on the board
        assert names & set(used), f"no {component} metric is queried"


# What issue 11 asks the dashboard to show, and a metric that shows it.
REQUIRED = {
    "request rate per adapter": "loraplane_router_requests_total",
    "latency per adapter": "loraplane_router_request_duration_seconds_bucket",
    "tokens per second": "loraplane_generated_tokens_total",
    "queue depth": "loraplane_queue_depth",
    "replicas desired": "loraplane_operator_desired_replicas",
    "replicas actual": "loraplane_operator_replicas",
    "adapters loaded per tier": "loraplane_adapters",
}


@pytest.mark.parametrize("metric", REQUIRED.values(), ids=REQUIRED.keys())
def test_dashboard_shows(metric: str) -> None:
    assert any(metric in metric_names(expr) for _, expr in queries(load()))


def test_panels_use_the_datasource_variable_and_do_not_overlap() -> None:
    dash = load()
    assert dash["uid"] == "loraplane"
    taken: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & taken, f"panel {p['title']!r} overlaps another"
        taken |= cells


def render(helm_bin: Path, *values: str) -> list[dict]:
    text = chart.render(helm_bin, "lp", "--namespace=lp-system", *values)
    return [d for d in yaml.safe_load_all(text) if d]


def test_chart_ships_the_dashboard_only_when_asked(helm_bin: Path) -> None:
    assert not [d for d in render(helm_bin) if d["kind"] == "ConfigMap"]
    (cm,) = [
        d
        for d in render(
            helm_bin,
            "--set=monitoring.dashboard.enabled=true",
            "--set=monitoring.dashboard.namespace=grafana",
            "--set=monitoring.dashboard.annotations.grafana_folder=LLM",
        )
        if d["kind"] == "ConfigMap"
    ]
    assert cm["metadata"]["namespace"] == "grafana"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # the sidecar's default label
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert json.loads(cm["data"]["loraplane.json"]) == load()
