"""Pod addresses where Services work: a 10.X.0.0/16 routed to the loopback interface per clone
(and a second one for kwok's pods).

EndpointSlices refuse loopback addresses, so agent pods on 127.x never back a Service. As root,
`ip route add local 10.X.0.0/16 dev lo` makes a whole /16 bindable and reachable like 127/8;
pods on it get real EndpointSlices. The route is machine-wide, so each clone (state folder and
API server) takes its own X, skipping any range a route or an interface already covers (another
clone's, the machine's own network), Services' 10.96/16 and kwok's 10.244/16. Where the route
cannot be added (not root, no `ip`, no CAP_NET_ADMIN) pods fall back to 127.Y.0.0/16, and
`status` says why.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

Network = ipaddress.IPv4Network

# Second octets of 10.X/16 never used (nor 0 and 255, which often are real networks).
RESERVED = {
    96: "Services (--service-cluster-ip-range=10.96.0.0/16)",
    244: "kwok's fake pod IPs (--cidr=10.244.0.0/16)",
}
FILE = "podnet.json"
# kwok's pod range where no route can be added: its pods are never dialed, so any range
# nobody routes will do; simulated runtimes then need root to make it bindable.
KWOK_FALLBACK = "10.244.0.0/16"


@dataclass(frozen=True)
class PodNetwork:
    cidr: str
    routed: bool  # a `local` route this clone added: valid in EndpointSlices, gone at `down`
    reason: str = ""  # why it fell back to loopback

    @property
    def network(self) -> Network:
        return ipaddress.IPv4Network(self.cidr)


def _key_hash(key: str) -> int:
    return zlib.crc32(key.encode())


def fallback(key: str) -> PodNetwork:
    """127.Y.0.0/16, stable per key, Y in [32, 224): bindable without setup, not routable."""
    return PodNetwork(f"127.{32 + _key_hash(key) % 192}.0.0/16", routed=False)


def candidates(key: str) -> list[Network]:
    """Every 10.X.0.0/16 but the reserved ones, starting at the one the key hashes to."""
    first = 1 + _key_hash(key) % 254
    octets = [(first - 1 + i) % 254 + 1 for i in range(254)]
    return [ipaddress.IPv4Network(f"10.{x}.0.0/16") for x in octets if x not in RESERVED]


def parse_prefixes(route_lines: str, addr_lines: str) -> list[Network]:
    """Prefixes already in use, from `ip -4 route show table all` and `ip -4 -o addr show`."""
    out = []
    for line in route_lines.splitlines():
        words = line.split()
        if not words:
            continue
        # "10.1.0.0/16 dev eth0 ..." or with a route type first: "local 10.9.0.0/16 dev lo ..."
        dest = words[0] if words[0][0].isdigit() or words[0] == "default" else words[1]
        if dest == "default":
            continue
        try:
            out.append(ipaddress.IPv4Network(dest, strict=False))
        except ValueError:
            continue
    for line in addr_lines.splitlines():
        words = line.split()
        if "inet" in words:
            out.append(ipaddress.IPv4Interface(words[words.index("inet") + 1]).network)
    return out


def pick(key: str, used: list[Network]) -> list[Network]:
    """The free candidates, in the key's order."""
    return [n for n in candidates(key) if not any(n.overlaps(u) for u in used)]


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def _used() -> list[Network]:
    routes = _ip("-4", "route", "show", "table", "all")
    addrs = _ip("-4", "-o", "addr", "show")
    return parse_prefixes(routes.stdout, addrs.stdout)


def route_exists(net: Network) -> bool:
    shown = _ip("-4", "route", "show", "table", "local", "type", "local", str(net))
    return str(net) in shown.stdout


def why_not_routable() -> str:
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) on this machine"
    if os.geteuid() != 0:
        return "not root: `ip route add local 10.X.0.0/16 dev lo` needs CAP_NET_ADMIN"
    return ""


@dataclass(frozen=True)
class Networks:
    """A clone's two address ranges: its agent pods' and kwok's fake pods'."""

    pods: PodNetwork
    kwok: PodNetwork

    def routed(self) -> list[Network]:
        return [n.network for n in (self.pods, self.kwok) if n.routed]


def setup(state: Path, key: str) -> Networks:
    """This clone's ranges: the ones recorded if their routes still stand, else new ones.

    Two routed /16s when root: one for agent pods, one for kwok, whose pod IPs are otherwise
    10.244.0.x in every clone, so two clusters' simulated runtimes would fight over them.
    """
    old = load(state)
    if old is not None and old.pods.routed and all(map(route_exists, old.routed())):
        return old
    if old is not None:
        _remove(old)
    got: list[Network] = []
    reason = why_not_routable()
    if not reason:
        for net in pick(key, _used()):
            added = _ip("route", "add", "local", str(net), "dev", "lo")
            if added.returncode == 0:
                got.append(net)
                if len(got) == 2:
                    break
            elif "File exists" not in added.stderr:  # anything but a clone racing us to it
                reason = f"`ip route add local {net} dev lo` failed: {added.stderr.strip()}"
                break
        else:
            reason = "fewer than two free 10.X.0.0/16 left (other clones' networks?)"
    if len(got) == 2:
        nets = Networks(PodNetwork(str(got[0]), routed=True), PodNetwork(str(got[1]), routed=True))
    else:
        for net in got:  # half a claim is no use: give it back
            _ip("route", "del", "local", str(net), "dev", "lo")
        nets = Networks(
            PodNetwork(fallback(key).cidr, routed=False, reason=reason),
            PodNetwork(KWOK_FALLBACK, routed=False, reason="kwok's pod IPs are never dialed"),
        )
    state.mkdir(parents=True, exist_ok=True)
    body = {"pods": asdict(nets.pods), "kwok": asdict(nets.kwok)}
    (state / FILE).write_text(json.dumps(body, indent=1) + "\n")
    return nets


def load(state: Path) -> Networks | None:
    try:
        body = json.loads((state / FILE).read_text())
        return Networks(PodNetwork(**body["pods"]), PodNetwork(**body["kwok"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _remove(nets: Networks) -> None:
    for net in nets.routed():
        if route_exists(net):
            _ip("route", "del", "local", str(net), "dev", "lo")


def teardown(state: Path) -> None:
    """Remove the routes this clone added (its pods are stopped by then) and forget them."""
    nets = load(state)
    if nets is not None:
        _remove(nets)
    (state / FILE).unlink(missing_ok=True)
