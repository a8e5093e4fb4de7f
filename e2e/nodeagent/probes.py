"""Readiness, liveness and startup probes, run against the pod's own loopback address."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field

from kubernetes import client


def _port(port: int | str, container: client.V1Container) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in container.ports or []:
        if p.name == port:
            return int(p.container_port)
    raise ValueError(f"container {container.name} has no port named {port!r}")


def probe_once(
    probe: client.V1Probe, container: client.V1Container, pod_ip: str, env: dict[str, str]
) -> tuple[bool, str]:
    """One attempt: (success, message)."""
    timeout = float(probe.timeout_seconds or 1)
    try:
        if probe.http_get is not None:
            return _http(probe.http_get, container, pod_ip, timeout)
        if probe.tcp_socket is not None:
            host = probe.tcp_socket.host or pod_ip
            with socket.create_connection((host, _port(probe.tcp_socket.port, container)), timeout):
                return True, ""
        if probe._exec is not None:
            proc = subprocess.run(
                probe._exec.command, env=env, capture_output=True, timeout=timeout
            )
            return proc.returncode == 0, proc.stdout.decode(errors="replace")[-200:]
    except (OSError, ValueError, subprocess.TimeoutExpired, http.client.HTTPException) as e:
        return False, f"{type(e).__name__}: {e}"
    return False, "probe type not supported by the node agent (grpc)"


def _http(
    get: client.V1HTTPGetAction, container: client.V1Container, pod_ip: str, timeout: float
) -> tuple[bool, str]:
    host = get.host or pod_ip
    port = _port(get.port, container)
    if (get.scheme or "HTTP").upper() == "HTTPS":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=ssl._create_unverified_context()
        )  # kubelet skips verification too
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"User-Agent": "kube-probe/1.34", "Accept": "*/*"}
        headers.update({h.name: h.value for h in get.http_headers or []})
        conn.request("GET", get.path or "/", headers=headers)
        resp = conn.getresponse()
        resp.read(1024)
        ok = 200 <= resp.status < 400
        return ok, "" if ok else f"HTTP probe failed with statuscode: {resp.status}"
    finally:
        conn.close()


@dataclass
class ProbeState:
    """Thresholds and timing of one probe on one container run (reset on restart)."""

    probe: client.V1Probe
    started: float  # when the container started
    result: bool | None = None  # None: not yet decided
    successes: int = 0
    failures: int = 0
    next_at: float = field(default=0.0)
    message: str = ""

    def __post_init__(self) -> None:
        self.next_at = self.started + float(self.probe.initial_delay_seconds or 0)

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def record(self, ok: bool, message: str, now: float) -> None:
        self.next_at = now + float(self.probe.period_seconds or 10)
        self.message = message
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= (self.probe.success_threshold or 1):
                self.result = True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.failures >= (self.probe.failure_threshold or 3):
                self.result = False


def now() -> float:
    return time.monotonic()
