"""Bounds on one fetch: bytes, wall time, cancellation, and where it may connect.

A source URL is chosen by whoever writes a LoraAdapter, so a fetch is untrusted work: it must
end (a deadline, a DELETE or a shutdown cancels it), stay small (downloaded and unpacked bytes
are counted), and not reach the node's own secrets (link-local and cloud metadata addresses
are refused before a connection is made).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlparse

from loraplane.api.wire import redact_source
from loraplane.runtime.adapters.errors import (
    AdapterError,
    Conflict,
    InsufficientStorage,
    InvalidSource,
    SourceTimeout,
    SourceTooLarge,
)

# Link-local (where every cloud's instance metadata and its credentials live) and the
# metadata addresses outside that range. Loopback and private ranges stay allowed: in-cluster
# mirrors live there.
DEFAULT_DENY = (
    "169.254.0.0/16",
    "fe80::/10",
    "100.100.100.200/32",  # Alibaba Cloud metadata
    "fd00:ec2::254/128",  # AWS metadata over IPv6
)

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = 4 << 30  # per adapter: downloaded, and unpacked from an archive
    timeout_s: float = 600.0  # per fetch, from the first byte asked to the last written
    read_timeout_s: float = 30.0  # silence on a connection before it counts as dead
    deny: tuple[IpNetwork, ...] = tuple(ipaddress.ip_network(n) for n in DEFAULT_DENY)
    allow: tuple[IpNetwork, ...] = ()  # carve-outs from deny

    def denies(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in n for n in self.allow):
            return False
        return any(ip in n for n in self.deny)


def parse_networks(cidrs: Iterable[str]) -> tuple[IpNetwork, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


class Cancelled(Conflict):
    """A DELETE, a newer PUT or a shutdown stopped the fetch (409)."""


@dataclass
class Guard:
    """One fetch's budget: checked by every loop that moves bytes."""

    limits: FetchLimits
    what: str  # the source, for messages (redacted here)
    cancel: threading.Event = field(default_factory=threading.Event)
    reason: list[str] = field(default_factory=list)  # why it was cancelled, when it was
    started: float = field(default_factory=time.monotonic)
    used: int = 0

    def __post_init__(self) -> None:
        self.what = redact_source(self.what)

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled(
                f"fetching {self.what} stopped: {self.reason[0] if self.reason else 'cancelled'}"
            )
        if time.monotonic() - self.started > self.limits.timeout_s:
            raise SourceTimeout(
                f"fetching {self.what} took more than --fetch-timeout "
                f"{self.limits.timeout_s:g} s; use a faster source or raise the limit"
            )

    def count(self, n: int) -> None:
        self.used += n
        if self.used > self.limits.max_bytes:
            raise SourceTooLarge(
                f"{self.what} is more than --max-adapter-bytes {self.limits.max_bytes} bytes "
                "(downloaded or unpacked); an adapter is far smaller"
            )
        self.check()

    def remaining_s(self) -> float:
        return max(0.0, self.limits.timeout_s - (time.monotonic() - self.started))

    def check_host(self, url: str) -> None:
        """Refuse a URL whose host resolves to a denied address (checked on every redirect)."""
        parsed = urlparse(url)
        host = parsed.hostname
        if not host:
            raise InvalidSource(f"{redact_source(url)} has no host")
        try:
            infos = socket.getaddrinfo(host, parsed.port or 443, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError):
            return  # the client reports the unreachable host in its own words
        for info in infos:
            address = str(info[4][0])
            if self.limits.denies(address):
                raise InvalidSource(
                    f"{redact_source(url)} resolves to {address}, a link-local or metadata "
                    "address this runtime does not fetch from; use --allow-source-cidr to allow it"
                )


class RedactUrls(logging.Filter):
    """httpx logs every request's full URL at INFO: presigned queries and passwords included."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_source(str(a)) if type(a).__name__ == "URL" else a for a in record.args
            )
        return True


def redact_client_logs() -> None:
    """Install RedactUrls on the HTTP client's logger, once per process."""
    logger = logging.getLogger("httpx")
    if not any(isinstance(f, RedactUrls) for f in logger.filters):
        logger.addFilter(RedactUrls())


def storage_error(e: OSError, what: str) -> AdapterError | None:
    """A full disk or quota is the node's problem, not the source's: 507, not a crash."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(
            f"no space left to store {redact_source(what)} in the cache dir: {e.strerror}; "
            "free space or give the runtime a larger cache volume"
        )
    return None
