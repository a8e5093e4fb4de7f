"""Loopback addresses for pods: 127.<octet>.x.y per node, skipping any address in use.

All of 127.0.0.0/8 routes to the loopback interface on Linux, so a process can bind any of
these without setup. Another agent on the machine (a second clone's cluster) may use the
same range; an address with a listening or connected socket is never handed out.
"""

from __future__ import annotations

import ipaddress
import threading
import zlib
from pathlib import Path


def node_octet(server: str, node: str) -> int:
    """A second octet for the node's range, stable per (API server, node), in [32, 224)."""
    return 32 + zlib.crc32(f"{server}|{node}".encode()) % 192


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
    def __init__(self, octet: int) -> None:
        assert 1 <= octet <= 254, octet
        self.octet = octet
        self.taken: set[str] = set()
        self._next = 0
        self._lock = threading.Lock()

    def allocate(self) -> str:
        with self._lock:
            busy = addresses_in_use() | self.taken
            for _ in range(256 * 254):
                self._next = self._next % (256 * 254) + 1
                x, y = divmod(self._next - 1, 254)
                ip = f"127.{self.octet}.{x}.{y + 1}"
                if ip not in busy:
                    self.taken.add(ip)
                    return ip
        raise RuntimeError(f"no free address left in 127.{self.octet}.0.0/16")

    def release(self, ip: str) -> None:
        with self._lock:
            self.taken.discard(ip)
