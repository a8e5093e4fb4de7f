"""The node agent's pure parts, without a cluster: $(VAR) expansion, addresses, probes, back-off."""

from __future__ import annotations

import ipaddress
import socket
import subprocess

import pytest
from e2e.cluster import podnet
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


class FakeIp:
    """`ip` as podnet calls it: routes in a list; `add` answers as the kernel would."""

    def __init__(self, routes: list[str], refuse: str = "") -> None:
        self.routes = routes
        self.refuse = refuse  # stderr of every `route add`, if it must fail
        self.added: list[str] = []

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        def done(rc: int = 0, out: str = "", err: str = "") -> subprocess.CompletedProcess[str]:
            return subprocess.CompletedProcess(["ip", *args], rc, out, err)

        if args[:2] == ("route", "add"):
            net = args[3]
            if self.refuse:
                return done(2, err=self.refuse)
            if any(r.startswith(f"local {net} ") for r in self.routes):
                return done(2, err="RTNETLINK answers: File exists")
            self.routes.append(f"local {net} dev lo scope host")
            self.added.append(net)
            return done()
        if args[:2] == ("route", "del"):
            self.routes = [r for r in self.routes if not r.startswith(f"local {args[3]} ")]
            return done()
        if "route" in args:  # show: every route, or the one asked for
            wanted = args[-1] if args[-1][0].isdigit() else ""
            return done(out="\n".join(r for r in self.routes if wanted in r))
        return done()  # addr show: nothing


def test_pod_network_route_is_added_reused_and_removed(tmp_path, monkeypatch) -> None:
    key = "clone|https://127.0.0.1:26443"
    first = podnet.pick(key, [])[0]
    # Another clone won the race for our first choice after we listed the routes.
    ip = FakeIp([])
    monkeypatch.setattr(podnet, "_used", lambda: [])
    ip.routes.append(f"local {first} dev lo scope host")
    monkeypatch.setattr(podnet, "_ip", ip)
    monkeypatch.setattr(podnet, "why_not_routable", lambda: "")
    nets = podnet.setup(tmp_path, key)
    assert nets.pods.routed and nets.kwok.routed
    assert ip.added == [nets.pods.cidr, nets.kwok.cidr] and first not in nets.routed()
    assert podnet.load(tmp_path) == nets
    assert podnet.setup(tmp_path, key) == nets and len(ip.added) == 2  # reused, not re-added
    podnet.teardown(tmp_path)
    assert ip.routes == [f"local {first} dev lo scope host"]  # only the other clone's is left
    assert podnet.load(tmp_path) is None


@pytest.mark.parametrize(
    "reason,refuse",
    [
        ("not root: `ip route add local 10.X.0.0/16 dev lo` needs CAP_NET_ADMIN", ""),
        ("", "RTNETLINK answers: Operation not permitted"),
    ],
    ids=["not-root", "no-cap-net-admin"],
)
def test_pod_network_falls_back_to_loopback_saying_why(
    tmp_path, monkeypatch, reason: str, refuse: str
) -> None:
    ip = FakeIp([], refuse=refuse)
    monkeypatch.setattr(podnet, "_ip", ip)
    monkeypatch.setattr(podnet, "_used", lambda: [])
    monkeypatch.setattr(podnet, "why_not_routable", lambda: reason)
    nets = podnet.setup(tmp_path, "clone|https://127.0.0.1:26443")
    net = nets.pods
    assert not net.routed and net.network.subnet_of(ipaddress.IPv4Network("127.0.0.0/8"))
    assert (reason or refuse) in net.reason and not ip.added
    assert nets.kwok == podnet.PodNetwork(podnet.KWOK_FALLBACK, False, nets.kwok.reason)
    podnet.teardown(tmp_path)  # nothing to remove, and no error


def test_pod_network_gives_back_half_a_claim(tmp_path, monkeypatch) -> None:
    """One free range is not enough (pods and kwok need one each): none is kept."""
    key = "clone|https://127.0.0.1:26443"
    free = podnet.pick(key, [])[0]
    others = [f"local {n} dev lo scope host" for n in podnet.pick(key, [])[1:]]
    ip = FakeIp(list(others))
    monkeypatch.setattr(podnet, "_ip", ip)
    monkeypatch.setattr(podnet, "_used", lambda: [])  # all taken only when adding
    monkeypatch.setattr(podnet, "why_not_routable", lambda: "")
    nets = podnet.setup(tmp_path, key)
    assert not nets.pods.routed and "fewer than two free" in nets.pods.reason
    assert ip.added == [str(free)] and ip.routes == others  # added, then given back
