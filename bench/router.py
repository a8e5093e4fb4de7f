"""The router's cost: added latency against calling a pod directly, and one process's throughput.

Three kinds of process on 127.0.0.1, each its own: fast fake pods (aiohttp, a fixed
completion answer, so the router's work dominates), one router process (the real app,
dispatch and upstream code of loraplane-router; its table is given on the command line
instead of read by watches, the only difference), and a load generator (aiohttp client).

- Added latency: one request at a time, --requests each, straight to a pod and through the
  router (interleaved in blocks, so drift hits both alike); p50 and p99 of each and of the
  difference.
- Throughput: --concurrency requests in flight for --seconds through the router, over every
  pod; answers per second, and the router's CPU time per second (1.0 = one core saturated).
  The load average before and after is printed: on a shared machine, other work shows.

    python bench/router.py                 # ~1 min
    python bench/router.py --record        # and append the table to docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
BASE = "bench"
ADAPTERS = ("a0", "a1", "a2", "a3")
ANSWER = {
    "id": "cmpl-bench",
    "object": "text_completion",
    "created": 0,
    "model": "a0",
    "choices": [{"index": 0, "text": " hello world", "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# ---- the processes ------------------------------------------------------------------------------


def serve_pod(port: int) -> None:
    """A fake runtime pod: every completion gets the same small answer at once."""
    from aiohttp import web

    body = json.dumps(ANSWER).encode()

    async def completions(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    web.run_app(app, host=LOOPBACK, port=port, print=None, access_log=None)


def serve_router(port: int, pods: list[int]) -> None:
    """The router's own app on a table of the fake pods: every adapter on every other pod."""
    import uvicorn

    from loraplane.router.app import create_app
    from loraplane.router.config import RouterConfig
    from loraplane.router.dispatch import Router
    from loraplane.router.keys import Access
    from loraplane.router.metrics import RouterMetrics
    from loraplane.router.upstream import Upstream

    config = RouterConfig(
        namespace="bench", base=BASE, pod_selector="bench=1", host=LOOPBACK, port=port
    )

    async def main() -> None:
        router = Router(config, Upstream(config), RouterMetrics())
        router.table.set_base({"metadata": {"name": BASE}, "spec": {"model": {"source": "x"}}})
        for i, pod_port in enumerate(pods):
            router.table.put_pod(_pod(f"pod-{i}", pod_port))
        for j, name in enumerate(ADAPTERS):
            holders = [f"pod-{i}" for i in range(len(pods)) if (i + j) % 2 == 0]
            router.table.put_adapter(_adapter(name, holders))
        router.synced.set()
        router.changed()
        app = create_app(router, Access(""), config)
        server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=port, log_level="warning"))
        await server.serve()

    asyncio.run(main())


def _pod(name: str, port: int) -> dict:
    return {
        "metadata": {"name": name},
        "spec": {
            "containers": [{"name": "runtime", "ports": [{"name": "http", "containerPort": port}]}]
        },
        "status": {
            "podIP": LOOPBACK,
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def _adapter(name: str, holders: list[str]) -> dict:
    ready = {"type": "Ready", "status": "True", "reason": "Loaded", "message": "",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}  # fmt: skip
    return {
        "metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"baseModel": BASE, "source": f"file:///adapters/{name}"},
        "status": {
            "replicas": [{"pod": p, "state": "Loaded"} for p in holders],
            "conditions": [ready],
        },
    }


class Processes:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
        proc = subprocess.Popen([sys.executable, __file__, *args], env=env)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_listening(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing listens on {port} after {timeout}s")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- the load ----------------------------------------------------------------------------------


async def sequential(session, url: str, n: int, model: str) -> list[float]:
    body = {"model": model, "prompt": "hi", "max_tokens": 2}
    out = []
    for _ in range(n):
        t = time.perf_counter()
        async with session.post(url, json=body) as r:
            await r.read()
            assert r.status == 200, r.status
        out.append(time.perf_counter() - t)
    return out


async def latency(router: int, pod: int, requests: int) -> tuple[list[float], list[float]]:
    import aiohttp

    direct: list[float] = []
    routed: list[float] = []
    block = 100
    async with aiohttp.ClientSession() as session:
        for url in (
            f"http://{LOOPBACK}:{pod}/v1/completions",
            f"http://{LOOPBACK}:{router}/v1/completions",
        ):
            await sequential(session, url, 50, "a0")  # warm connections and code paths
        for _ in range(max(1, requests // block)):
            direct += await sequential(
                session, f"http://{LOOPBACK}:{pod}/v1/completions", block, "a0"
            )
            routed += await sequential(
                session, f"http://{LOOPBACK}:{router}/v1/completions", block, "a0"
            )
    return direct, routed


async def throughput(router: int, concurrency: int, seconds: float) -> tuple[int, int]:
    import aiohttp

    done = errors = 0
    stop = time.monotonic() + seconds
    url = f"http://{LOOPBACK}:{router}/v1/completions"

    async def client(i: int) -> None:
        nonlocal done, errors
        body = {"model": ADAPTERS[i % len(ADAPTERS)], "prompt": "hi", "max_tokens": 2}
        while time.monotonic() < stop:
            async with session.post(url, json=body) as r:
                await r.read()
                if r.status == 200:
                    done += 1
                else:
                    errors += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(i) for i in range(concurrency)))
    return done, errors


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=1000, method="inclusive")[round(q * 10) - 1]


@dataclass
class Result:
    direct: list[float]
    routed: list[float]
    rps: float
    errors: int
    router_cpu: float
    concurrency: int
    pods: int
    load: tuple[float, float]

    def table(self) -> str:
        ms = 1000.0
        rows = [
            ("direct to a pod", pct(self.direct, 50) * ms, pct(self.direct, 99) * ms),
            ("through the router", pct(self.routed, 50) * ms, pct(self.routed, 99) * ms),
        ]
        added50 = (pct(self.routed, 50) - pct(self.direct, 50)) * ms
        added99 = (pct(self.routed, 99) - pct(self.direct, 99)) * ms
        lines = [
            "| path | p50 ms | p99 ms |",
            "|---|---|---|",
            *(f"| {name} | {p50:.2f} | {p99:.2f} |" for name, p50, p99 in rows),
            f"| **added by the router** | **{added50:.2f}** | **{added99:.2f}** |",
            "",
            f"Throughput of one router process, {self.concurrency} requests in flight over "
            f"{self.pods} pods: **{self.rps:.0f} requests/s** ({self.errors} errors), the "
            f"router using {self.router_cpu:.2f} s of CPU per s: "
            f"{1000 * self.router_cpu / self.rps:.2f} ms of CPU per request, so about "
            f"{self.rps / self.router_cpu:.0f} requests/s per core it has to itself. Load "
            f"average {self.load[0]:.1f} before, {self.load[1]:.1f} after, on "
            f"{os.cpu_count()} cores.",
        ]
        return "\n".join(lines)


def run(args: argparse.Namespace) -> Result:
    procs = Processes()
    try:
        pod_ports = [free_port() for _ in range(args.pods)]
        for port in pod_ports:
            procs.start("--serve-pod", str(port))
        router_port = free_port()
        router = procs.start("--serve-router", str(router_port), *map(str, pod_ports))
        for port in [*pod_ports, router_port]:
            wait_listening(port)
        load_before = os.getloadavg()[0]
        direct, routed = asyncio.run(latency(router_port, pod_ports[0], args.requests))
        cpu0, t0 = cpu_seconds(router.pid), time.monotonic()
        done, errors = asyncio.run(throughput(router_port, args.concurrency, args.seconds))
        wall = time.monotonic() - t0
        cpu = (cpu_seconds(router.pid) - cpu0) / wall
        load = (load_before, os.getloadavg()[0])
        return Result(direct, routed, done / wall, errors, cpu, args.concurrency, args.pods, load)
    finally:
        procs.stop()


def record(res: Result, command: str) -> None:
    doc = REPO / "docs" / "benchmarks.md"
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    text = (
        f"\n### Router run {stamp} ({os.cpu_count()}-core {platform.machine()} VM, shared, "
        "no GPU)\n\n"
        f"`{command}`\n\n{res.table()}\n"
    )
    with doc.open("a") as f:
        f.write(text)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-pod":
        serve_pod(int(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-router":
        serve_router(int(sys.argv[2]), [int(p) for p in sys.argv[3:]])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="sequential requests per path")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    args = p.parse_args()
    res = run(args)
    print(res.table())
    if args.record:
        record(res, "python bench/router.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
