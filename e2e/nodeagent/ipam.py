"""Pod addresses from the cluster's pod network (a /16), skipping any address in use.

The network is a 10.X.0.0/16 routed to the loopback interface (e2e/cluster/podnet.py), or,
where that route could not be added, a 127.Y.0.0/16: all of 127/8 routes to the loopback
interface on Linux, so a process can bind either without further setup. Another agent on the
machine may share a fallback range; an address with a listening or connected socket is never
handed out.
"""

from __future__ import annotations

import ipaddress
import threading
from pathlib import Path


def addresses_in_use() -> set[str]:
    used = set()
    for table in ("/proc/net/tcp", "/proc/net/udp"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local = line.split()[1].split(":")[0]
            # Little-endian hex of the IPv4 address.
            used.add(str(ipaddress.IPv4Address(bytes.fromhex(local)[::-1])))
    return used


class Ipam:
    def __init__(self, network: str) -> None:
        self.network = ipaddress.IPv4Network(network)
        if self.network.prefixlen != 16:
            raise ValueError(f"the pod network must be a /16, got {network}")
        self.taken: set[str] = set()
        self._next = 0
        self._lock = threading.Lock()

    def allocate(self) -> str:
        base = int(self.network.network_address)
        with self._lock:
            busy = addresses_in_use() | self.taken
            # x.y.N.1 .. x.y.N.254 for every N: no address ends in .0 or .255.
            for _ in range(256 * 254):
                self._next = self._next % (256 * 254) + 1
                hi, lo = divmod(self._next - 1, 254)
                ip = str(ipaddress.IPv4Address(base + hi * 256 + lo + 1))
                if ip not in busy:
                    self.taken.add(ip)
                    return ip
        raise RuntimeError(f"no free address left in {self.network}")

    def release(self, ip: str) -> None:
        with self._lock:
            self.taken.discard(ip)
