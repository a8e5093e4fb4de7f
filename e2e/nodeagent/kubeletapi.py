"""The slice of the kubelet API the agent serves: container logs, so `kubectl logs` works.

Only the API server calls it, on 127.0.0.1; it serves the log files the agent writes.
"""

from __future__ import annotations

import http.server
import logging
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("nodeagent.kubeletapi")

# (namespace, pod, container) -> the container's log file, or None when unknown
LogLookup = Callable[[str, str, str], "Path | None"]


class KubeletAPI(threading.Thread):
    def __init__(
        self, cert: Path, key: Path, find_log: LogLookup, alive: Callable[[str, str], bool]
    ) -> None:
        super().__init__(name="kubelet-api", daemon=True)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        handler = type(
            "Handler",
            (_Handler,),
            {"find_log": staticmethod(find_log), "alive": staticmethod(alive)},
        )
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port: int = self.server.server_address[1]

    def run(self) -> None:
        self.server.serve_forever(poll_interval=0.5)

    def stop(self) -> None:
        self.server.shutdown()


class _Handler(http.server.BaseHTTPRequestHandler):
    find_log: LogLookup
    alive: Callable[[str, str], bool]

    def log_message(self, fmt: str, *args: object) -> None:
        log.debug(fmt, *args)

    def do_GET(self) -> None:
        url = urllib.parse.urlparse(self.path)
        parts = url.path.strip("/").split("/")
        if parts == ["healthz"]:
            return self._send(200, b"ok")
        if len(parts) != 4 or parts[0] != "containerLogs":
            return self._send(404, b"the node agent serves only /containerLogs and /healthz")
        _, ns, pod, container = parts
        path = self.find_log(ns, pod, container)
        if path is None or not path.exists():
            return self._send(404, f"no logs for container {container} of pod {ns}/{pod}".encode())
        q = urllib.parse.parse_qs(url.query)
        lines = path.read_bytes().splitlines(keepends=True)
        if "tailLines" in q:
            lines = lines[-int(q["tailLines"][0]) :] if int(q["tailLines"][0]) > 0 else []
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"".join(lines))
        if q.get("follow", ["false"])[0] == "true":
            self._follow(path, ns, pod)

    def _follow(self, path: Path, ns: str, pod: str) -> None:
        offset = path.stat().st_size
        try:
            while self.alive(ns, pod):
                size = path.stat().st_size
                if size > offset:
                    with open(path, "rb") as f:
                        f.seek(offset)
                        self.wfile.write(f.read(size - offset))
                    self.wfile.flush()
                    offset = size
                time.sleep(0.5)
        except (OSError, ConnectionError):
            pass  # the client went away

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
