"""The node agent's pure parts, without a cluster: $(VAR) expansion, addresses, probes, back-off."""

from __future__ import annotations

import socket

from e2e.nodeagent.container import Backoff
from e2e.nodeagent.envvars import expand
from e2e.nodeagent.ipam import Ipam, addresses_in_use, node_octet
from e2e.nodeagent.pod import termination_grace
from e2e.nodeagent.probes import ProbeState
from kubernetes import client


def test_expand_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert expand("x$(A)y$(B)", env) == "x1ytwo"
    assert expand("$(MISSING)", env) == "$(MISSING)"  # undefined stays as written
    assert expand("$$(A)", env) == "$(A)"  # $$ escapes
    assert expand("cost $5", env) == "cost $5"


def test_ipam_skips_addresses_in_use() -> None:
    octet = node_octet("https://127.0.0.1:1", "unit-test-node")
    assert 32 <= octet < 224
    busy = f"127.{octet}.0.1"  # the first address a fresh range would hand out
    with socket.socket() as s:
        s.bind((busy, 0))
        s.listen()
        assert busy in addresses_in_use()
        ipam = Ipam(octet)
        got = [ipam.allocate() for _ in range(3)]
    assert busy not in got and len(set(got)) == 3
    ipam.release(got[0])
    assert got[0] not in ipam.taken


def test_probe_thresholds() -> None:
    probe = client.V1Probe(
        initial_delay_seconds=2, period_seconds=1, failure_threshold=2, success_threshold=1
    )
    st = ProbeState(probe, started=100.0)
    assert not st.due(101.0) and st.due(102.0)
    st.record(False, "no", 102.0)
    assert st.result is None  # one failure is below the threshold
    st.record(False, "no", 103.0)
    assert st.result is False
    st.record(True, "", 104.0)
    assert st.result is True and st.next_at == 105.0


def test_backoff_doubles_to_a_cap() -> None:
    b = Backoff(initial=1, cap=5)
    assert [b.next() for _ in range(5)] == [1, 2, 4, 5, 5]


def test_termination_grace_zero_means_at_once() -> None:
    def pod(grace: int | None) -> client.V1Pod:
        spec = client.V1PodSpec(containers=[], termination_grace_period_seconds=grace)
        return client.V1Pod(spec=spec)

    assert termination_grace(pod(0)) == 0.0
    assert termination_grace(pod(None)) == 30.0
    assert termination_grace(pod(7)) == 7.0


def test_stop_kills_a_process_that_ignores_sigterm_after_the_grace(tmp_path) -> None:
    import os
    import time

    from e2e.nodeagent.container import Container

    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    stubborn += "print('up', flush=True); time.sleep(60)"
    spec = client.V1Container(name="stubborn", command=["python3", "-c", stubborn])
    c = Container(spec, tmp_path / "c.log", tmp_path / "c.pid")
    c.start(dict(os.environ), tmp_path)
    deadline = time.monotonic() + 20
    while "up" not in c.log.read_text():  # SIGTERM is ignored from here on
        assert time.monotonic() < deadline, "the process did not start"
        time.sleep(0.02)
    started = time.monotonic()
    c.stop(grace=1.0)
    took = time.monotonic() - started
    assert 0.9 <= took < 5, took
    assert c.terminated is not None and c.terminated["exitCode"] == 137  # 128 + SIGKILL
    assert not c.running and not c.pidfile.exists()
