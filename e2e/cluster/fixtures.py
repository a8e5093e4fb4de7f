"""Pytest fixtures for a real cluster, shared by tests/cluster/ and the e2e suite.

A conftest.py imports them: `from e2e.cluster.fixtures import *  # noqa: F403`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import chart
from .paths import REPO, Bins
from .testing import Kube, delete_namespace, namespace_prefix, new_namespace, session_cluster

__all__ = [
    "crds",
    "helm_bin",
    "kube",
    "namespace",
    "operator_role",
    "pytest_runtest_makereport",
]

CRDS = REPO / "crds"
_reports = pytest.StashKey[dict]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    report = yield
    item.stash.setdefault(_reports, {})[report.when] = report
    return report


@pytest.fixture(scope="session")
def kube() -> Iterator[Kube]:
    with session_cluster() as k:
        yield k


@pytest.fixture(scope="session")
def crds(kube: Kube) -> list[str]:
    """Install crds/*.yaml and wait until every one is Established; returns their names."""
    files = sorted(CRDS.glob("*.yaml"))
    if not files:
        pytest.fail(f"no CRDs in {CRDS}: generate them with `make crds`")
    names = []
    for f in files:
        out = kube.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=loraplane-tests",
            "-f",
            str(f),
            "-o",
            "name",
        )
        names += [line.split("/", 1)[1] for line in out.stdout.split()]
    kube.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", *[f"crd/{n}" for n in names]
    )
    return names


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    """The built helm; rendering the chart needs no cluster."""
    path = Bins.default().helm
    if not path.exists():
        pytest.fail(f"helm is not built ({path} missing): run `make cluster-bins` in {REPO}")
    return path


@pytest.fixture(scope="session")
def operator_role(kube: Kube) -> str:
    """The chart's ClusterRole, bound to the local user loraplane-operator: applied again so a
    cluster started before the chart changed has the current rules. Returns its name."""
    if kube.local is None:
        pytest.skip("the operator user and its ClusterRole exist in the local control plane")
    chart.apply_operator_rbac(kube.local)
    return chart.OPERATOR_ROLE


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (generateName) per test, deleted afterwards; on failure the test's
    Events, objects and pod logs are printed."""
    name = new_namespace(kube, namespace_prefix(request.node.nodeid))
    yield name
    reports = request.node.stash.get(_reports, {})
    if any(r.failed for r in reports.values()):
        print(
            f"\n===== cluster state for failed test, namespace {name} =====\n{kube.explain(name)}"
        )
    delete_namespace(kube, name)
