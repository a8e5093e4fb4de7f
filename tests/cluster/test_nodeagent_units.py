"""The node agent's pure parts, without a cluster: $(VAR) expansion, addresses, probes, back-off."""

from __future__ import annotations

import ipaddress
import socket

from e2e.cluster.podnet import RESERVED, fallback, parse_prefixes, pick
from e2e.nodeagent.container import Backoff
from e2e.nodeagent.envvars import expand
from e2e.nodeagent.ipam import Ipam, addresses_in_use
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
    net = fallback("https://127.0.0.1:1|unit-test").network  # 127/8: bindable without a route
    assert net.subnet_of(ipaddress.IPv4Network("127.0.0.0/8")) and net.prefixlen == 16
    busy = str(net.network_address + 1)  # the first address a fresh range would hand out
    with socket.socket() as s:
        s.bind((busy, 0))
        s.listen()
        assert busy in addresses_in_use()
        ipam = Ipam(str(net))
        got = [ipam.allocate() for _ in range(3)]
    assert busy not in got and len(set(got)) == 3
    assert all(ipaddress.IPv4Address(ip) in net for ip in got)
    ipam.release(got[0])
    assert got[0] not in ipam.taken


def test_ipam_never_hands_out_dot_zero_or_dot_255() -> None:
    ipam = Ipam("10.77.0.0/16")
    ipam._next = 250  # near the end of the first /24
    got = [ipam.allocate() for _ in range(8)]
    assert got[:4] == ["10.77.0.251", "10.77.0.252", "10.77.0.253", "10.77.0.254"]
    assert got[4:] == ["10.77.1.1", "10.77.1.2", "10.77.1.3", "10.77.1.4"]


def test_pod_network_skips_reserved_and_used_ranges() -> None:
    routes = "\n".join(
        [
            "default via 192.0.2.1 dev eth0",
            "10.0.0.0/8 via 10.128.0.1 dev eth1 table 7",  # would cover them all: skip below
            "local 10.50.0.0/16 dev lo table local proto kernel scope host",
            "broadcast 127.255.255.255 dev lo table local proto kernel scope link",
        ]
    )
    addrs = "2: eth0    inet 10.60.3.4/24 brd 10.60.3.255 scope global eth0"
    used = parse_prefixes(routes, addrs)
    assert ipaddress.IPv4Network("10.50.0.0/16") in used
    assert ipaddress.IPv4Network("10.60.3.0/24") in used
    assert pick("any", used) == []  # 10/8 is somebody's: nothing is free
    used = [u for u in used if u.prefixlen > 8]
    free = pick("clone-a|https://127.0.0.1:26443", used)
    octets = {int(str(n).split(".")[1]) for n in free}
    assert not octets & ({50, 60} | set(RESERVED))
    assert len(free) == 254 - len(RESERVED) - 2
    # Stable per key, and two keys usually start in different places.
    assert free == pick("clone-a|https://127.0.0.1:26443", used)
    assert free[0] != pick("clone-b|https://127.0.0.1:26443", used)[0]


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
