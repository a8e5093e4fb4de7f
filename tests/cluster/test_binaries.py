"""The cached binaries are the versions e2e/cluster/versions.env pins, stamped as upstream's."""

from __future__ import annotations

import subprocess

import pytest
from e2e.cluster.paths import Bins, versions

BINS = Bins.default()
V = versions()


@pytest.fixture(autouse=True)
def built() -> None:
    if BINS.missing():
        pytest.fail(f"binaries not built ({BINS.missing()[0]}): run `make cluster-bins`")


def run(*argv: object) -> str:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("name", ["kube-apiserver", "kube-controller-manager", "kube-scheduler"])
def test_kubernetes_servers(name: str) -> None:
    assert run(BINS.k8s(name), "--version").strip() == f"Kubernetes {V['K8S_VERSION']}"


def test_kubectl() -> None:
    # An unstamped kubectl says v0.0.0-master and warns about version skew.
    assert f"Client Version: {V['K8S_VERSION']}" in run(BINS.kubectl, "version", "--client")


def test_etcd() -> None:
    assert f"etcd Version: {V['ETCD_VERSION'].lstrip('v')}" in run(BINS.etcd, "--version")


def test_helm() -> None:
    assert run(BINS.helm, "version", "--short").startswith(V["HELM_VERSION"])


def test_kwok_and_its_stages() -> None:
    assert V["KWOK_VERSION"] in run(BINS.kwok, "--version")
    stages = BINS.kwok_stages.read_text()
    for name in ("node-initialize", "node-heartbeat-with-lease", "pod-ready", "pod-delete"):
        assert f"name: {name}" in stages
