"""Making kwok's fake pod IPs bindable on this machine: a `local` route on lo, as root.

`ip route add local 10.244.0.0/16 dev lo` makes every address of the range bindable and
reachable like 127/8. Without it, a dial of a kwok pod IP reaches the machine's egress proxy,
which answers 404 for anything: it would look like "adapter not found".

The route is machine-wide and several simulated runtimes may use it at once (one per test
namespace), so each registers its pid under STATE/<net>/; the last one to leave removes the
route, and only when one of them added it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = 16  # one route for a whole kwok range (its default --cidr is a /16)
STATE = Path("/tmp/loraplane-simruntime-routes")


def bindable(ip: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((ip, 0))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


class LocalRoutes:
    def __init__(self, allowed: bool, state: Path = STATE) -> None:
        self.allowed = allowed
        self.state = state
        self.joined: set[str] = set()  # nets this process registered for

    def ensure(self, ip: str) -> bool:
        """Whether ip is bindable now, adding a route for its /16 when allowed."""
        if not self.allowed:
            return bindable(ip)
        net = str(ipaddress.ip_network(f"{ip}/{PREFIX}", strict=False))
        with self._locked(net) as d:
            if net not in self.joined:
                (d / str(os.getpid())).touch()
                self.joined.add(net)
            if not bindable(ip):
                _ip("add", net)
                (d / "added").touch()
                log.info("added route: local %s dev lo (removed by the last user at exit)", net)
        return bindable(ip)

    def remove_all(self) -> None:
        for net in sorted(self.joined):
            with self._locked(net) as d:
                (d / str(os.getpid())).unlink(missing_ok=True)
                users = [p for p in d.iterdir() if p.name.isdigit() and _alive(int(p.name))]
                if users or not (d / "added").exists():
                    continue
                try:
                    _ip("del", net)
                    log.info("removed route: local %s dev lo", net)
                except (OSError, subprocess.CalledProcessError) as e:
                    log.warning("could not remove route local %s dev lo: %s", net, e)
                (d / "added").unlink(missing_ok=True)
        self.joined.clear()

    @contextlib.contextmanager
    def _locked(self, net: str) -> Iterator[Path]:
        d = self.state / net.replace("/", "_")
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield d


def _alive(pid: int) -> bool:
    return pid != os.getpid() and Path(f"/proc/{pid}").exists()


def _ip(verb: str, net: str) -> None:
    ip = shutil.which("ip") or "/sbin/ip"
    subprocess.run(
        [ip, "route", verb, "local", net, "dev", "lo"],
        check=True,
        capture_output=True,
        timeout=10,
    )
