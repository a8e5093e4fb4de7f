"""The operator at scale on the local cluster: kwok pods answered by the simulated runtime.

Starts (or reuses) the local control plane, kwok GPU nodes, e2e/simruntime and the operator as
a local process; applies one BaseModelDeployment of --replicas pods on the kwok nodes and
--adapters LoraAdapters; times convergence (every adapter Ready with loadedReplicas ==
replicas), then --new more adapters one at a time from create to Ready on every replica, then
the operator's CPU and memory at steady state. Prints a table; --record appends it to
docs/benchmarks.md.

    python bench/operator_scale.py                                  # 200 x 1,000, 20 new
    python bench/operator_scale.py --replicas 20 --adapters 50 --new 5   # smoke, ~1 min
"""

from __future__ import annotations

import os
import sys

# Run as `python bench/operator_scale.py`, this file's folder is first on sys.path and the file would
# shadow the standard library's `operator` (argparse imports it): take the folder off first.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import argparse
import contextlib
import json
import math
import shlex
import signal
import socket
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from e2e.cluster.testing import (  # noqa: E402
    KWOK_SET,
    KWOK_TOLERATION,
    Kube,
    delete_namespace,
    is_ready,
    kwok_nodes,
    new_namespace,
    session_cluster,
    wait_for,
)
from e2e.simruntime.launch import simruntime  # noqa: E402

from loraplane.api import BASE_MODEL_DEPLOYMENT, GROUP, LORA_ADAPTER, VERSION  # noqa: E402

BASE = "bench"
GPUS_PER_NODE = 8
CHUNK = 200  # objects per kubectl apply
PROGRESS_EVERY_S = 15.0
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"


@dataclass
class Result:
    replicas: int
    adapters: int
    load_seconds: float
    pods_ready_s: float = math.nan
    converged_s: float = math.nan
    new_s: list[float] = field(default_factory=list)
    cpu_pct: float = math.nan
    rss_mb: float = math.nan
    peak_rss_mb: float = math.nan
    sim_rss_mb: float = math.nan
    sync_mean_s: float = math.nan
    window_s: float = math.nan


# ---- the processes --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def operator(kube: Kube, namespace: str, log: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    """python -m loraplane.operator, watching only the bench's namespace; (process, metrics port)."""
    metrics_port = free_port()
    env = dict(
        os.environ,
        KUBECONFIG=str(kube.kubeconfig),
        LORAPLANE_NAMESPACES=namespace,
        LORAPLANE_BIND_ADDRESS="127.0.0.1",
        LORAPLANE_METRICS_PORT=str(metrics_port),
        LORAPLANE_HEALTH_PORT=str(free_port()),
    )
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loraplane.operator"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        yield proc, metrics_port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def cpu_seconds(pid: int) -> float:
    # utime and stime, fields 14 and 15 of /proc/<pid>/stat (after the command in parentheses).
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


def sync_mean_s(metrics_port: int) -> float:
    """Mean duration of the operator's fleet syncs, from its own /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.endswith(("sync_seconds_sum", "sync_seconds_count")):
            values[name.rsplit("_", 1)[1]] = float(value)
    return values["sum"] / values["count"] if values.get("count") else math.nan


# ---- the objects ------------------------------------------------------------------------------
def base_model(namespace: str, replicas: int) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": BASE_MODEL_DEPLOYMENT.kind,
        "metadata": {"name": BASE},
        "spec": {
            "model": {"source": "hf://bench/base-7b"},
            "runtime": {"resources": {"gpus": 1}},
            "scheduling": {"nodeSelector": {KWOK_SET: namespace}, "tolerations": [KWOK_TOLERATION]},
            "maxAdapters": 128,
            "replicas": replicas,
        },
    }


def adapter(name: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": LORA_ADAPTER.kind,
        "metadata": {"name": name},
        "spec": {"baseModel": BASE, "source": f"hf://bench/{name}"},
    }


def apply(kube: Kube, namespace: str, objects: list[dict]) -> None:
    for i in range(0, len(objects), CHUNK):
        body = {"apiVersion": "v1", "kind": "List", "items": objects[i : i + CHUNK]}
        kube.kubectl(
            "apply", "--server-side", "--field-manager=bench", "-n", namespace, "-f", "-",
            input=json.dumps(body),
        )  # fmt: skip


def install_crds(kube: Kube) -> None:
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    kube.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")


# ---- waiting ------------------------------------------------------------------------------------
def adapter_rows(kube: Kube, namespace: str) -> dict[str, tuple[str, str]]:
    """name -> (status.loaded, Ready status), from the server's Table: a few bytes an adapter,
    where the objects carry a row per replica."""
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{LORA_ADAPTER.plural}"
    resp = kube.api.call_api(
        path, "GET", header_params={"Accept": TABLE}, auth_settings=["BearerToken"],
        _preload_content=False, _return_http_data_only=True,
    )  # fmt: skip
    table = json.loads(resp.data)
    columns = [c["name"] for c in table["columnDefinitions"]]
    loaded, ready = columns.index("Loaded"), columns.index("Ready")
    return {
        r["object"]["metadata"]["name"]: (r["cells"][loaded], r["cells"][ready])
        for r in table["rows"]
    }


def wait_converged(
    kube: Kube, namespace: str, replicas: int, adapters: int, timeout: float
) -> None:
    want = f"{replicas}/{replicas}"
    last = 0.0

    def done() -> bool:
        nonlocal last
        rows = adapter_rows(kube, namespace)
        ok = sum(1 for loaded, ready in rows.values() if loaded == want and ready == "True")
        if time.monotonic() - last > PROGRESS_EVERY_S:
            last = time.monotonic()
            print(f"  {ok}/{adapters} adapters Ready on {want} replicas", flush=True)
        return len(rows) == adapters and ok == adapters

    wait_for(done, timeout, f"{adapters} adapters Ready on {replicas} replicas", interval=1.0)


def wait_pods_ready(kube: Kube, namespace: str, replicas: int, timeout: float) -> None:
    def ready() -> bool:
        status = kube.get_json("deploy", BASE, "-n", namespace).get("status", {})
        return status.get("readyReplicas") == replicas

    wait_for(ready, timeout, f"{replicas} runtime pods Ready (gates open)", interval=0.5)


def time_new_adapter(kube: Kube, namespace: str, name: str, replicas: int, timeout: int) -> float:
    """Seconds from the create call to Ready with loadedReplicas == replicas (by watch)."""
    from kubernetes import watch

    started = time.perf_counter()
    created = kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, LORA_ADAPTER.plural, adapter(name)
    )
    w = watch.Watch()
    for event in w.stream(
        kube.custom.list_namespaced_custom_object, GROUP, VERSION, namespace,
        LORA_ADAPTER.plural, field_selector=f"metadata.name={name}",
        resource_version=created["metadata"]["resourceVersion"], timeout_seconds=timeout,
    ):  # fmt: skip
        status = event["object"].get("status") or {}
        if status.get("loadedReplicas") == replicas and is_ready(event["object"]):
            w.stop()
            return time.perf_counter() - started
    raise TimeoutError(f"adapter {name} not Ready on {replicas} replicas within {timeout}s")


# ---- cleanup ------------------------------------------------------------------------------------
def release(kube: Kube, namespace: str) -> None:
    """With the operator stopped nothing removes its finalizers: drop them, then the namespace."""
    for plural in (LORA_ADAPTER.plural, BASE_MODEL_DEPLOYMENT.plural):
        items = kube.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
        for item in items["items"]:
            if item["metadata"].get("finalizers"):
                kube.custom.patch_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, item["metadata"]["name"],
                    {"metadata": {"finalizers": None}},
                )  # fmt: skip
    delete_namespace(kube, namespace)


# ---- the run ------------------------------------------------------------------------------------
def run(args: argparse.Namespace, kube: Kube, out: Path) -> Result:
    res = Result(args.replicas, args.adapters, args.load_seconds)
    install_crds(kube)
    namespace = new_namespace(kube, "bench-operator-")
    nodes = math.ceil(args.replicas / GPUS_PER_NODE)
    sim_args = (f"--load-seconds={args.load_seconds}",)
    # Outlive every phase: a simulated runtime that stops mid-run would empty every pod.
    lifetime = 3 * args.timeout + args.new * 300 + args.window
    print(f"namespace {namespace}: {nodes} kwok nodes, logs in {out}", flush=True)
    try:
        with (
            kwok_nodes(kube, f"{namespace}-", nodes, GPUS_PER_NODE),
            simruntime(
                kube.kubeconfig, out / "simruntime.log", (namespace,), sim_args, lifetime
            ) as sim,
            operator(kube, namespace, out / "operator.log") as (op, metrics_port),
        ):
            started = time.monotonic()
            names = [f"a{i:04d}" for i in range(args.adapters)]
            apply(kube, namespace, [base_model(namespace, args.replicas)])
            apply(kube, namespace, [adapter(n) for n in names])
            print(f"applied 1 base x {args.replicas} replicas and {args.adapters} adapters")
            wait_pods_ready(kube, namespace, args.replicas, args.timeout)
            res.pods_ready_s = time.monotonic() - started
            print(f"  {args.replicas} pods Ready after {res.pods_ready_s:.1f} s", flush=True)
            wait_converged(kube, namespace, args.replicas, args.adapters, args.timeout)
            res.converged_s = time.monotonic() - started
            print(f"converged after {res.converged_s:.1f} s", flush=True)
            for i in range(args.new):
                s = time_new_adapter(kube, namespace, f"new{i:03d}", args.replicas, 300)
                res.new_s.append(s)
                print(f"  new adapter {i + 1}/{args.new}: {s:.2f} s", flush=True)
            measure_steady(res, op.pid, sim.pid, args.window)
            res.sync_mean_s = sync_mean_s(metrics_port)
    finally:
        release(kube, namespace)
    return res


def measure_steady(res: Result, pid: int, sim_pid: int, window: float) -> None:
    """CPU over a window with nothing changing (periodic resyncs included), and memory."""
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    deadline = t0 + window
    while time.monotonic() < deadline:  # the window is the measurement, not a wait for state
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    res.window_s = time.monotonic() - t0
    res.cpu_pct = 100 * (cpu_seconds(pid) - cpu0) / res.window_s
    res.rss_mb, res.peak_rss_mb = memory_mb(pid), memory_mb(pid, "VmHWM")
    res.sim_rss_mb = memory_mb(sim_pid)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def table(res: Result) -> str:
    rows = [
        ("replicas x adapters", f"{res.replicas} x {res.adapters}"),
        ("simulated load per PUT", f"{res.load_seconds * 1000:.0f} ms"),
        ("pods Ready (gates open) after apply", f"{res.pods_ready_s:.1f} s"),
        ("every adapter Ready on every replica", f"{res.converged_s:.1f} s"),
        (f"new adapter to Ready, p50 (n={len(res.new_s)})", f"{percentile(res.new_s, 0.5):.2f} s"),
        (f"new adapter to Ready, p99 (n={len(res.new_s)})", f"{percentile(res.new_s, 0.99):.2f} s"),
        ("new adapter to Ready, mean", f"{statistics.fmean(res.new_s or [math.nan]):.2f} s"),
        ("operator mean fleet sync", f"{res.sync_mean_s:.2f} s"),
        (f"operator CPU, steady ({res.window_s:.0f} s)", f"{res.cpu_pct:.0f} % of a core"),
        ("operator RSS, steady / peak", f"{res.rss_mb:.0f} MB / {res.peak_rss_mb:.0f} MB"),
        (f"simulated runtime RSS ({res.replicas} pods)", f"{res.sim_rss_mb:.0f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'measure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)


def record(res: Result, command: str) -> None:
    doc = REPO / "docs" / "benchmarks.md"
    text = doc.read_text()
    if "## Operator at scale" not in text:
        text += (
            "\n## Operator at scale (kwok + simulated runtime)\n\n"
            "`bench/operator_scale.py`: the local control plane, kwok GPU nodes, e2e/simruntime "
            "answering each kwok pod on its IP, and the operator as a local process. Converged "
            "means every LoraAdapter Ready with loadedReplicas == replicas; a new adapter is "
            "timed from its create call to that state, by watch.\n"
        )
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text += f"\n### {date}, {os.cpu_count()} CPUs (shared)\n\n`{command}`\n\n{table(res)}\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--replicas", type=int, default=200)
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--new", type=int, default=20, help="new adapters timed one at a time")
    p.add_argument("--load-seconds", type=float, default=0.05, help="simulated load per PUT")
    p.add_argument("--window", type=float, default=60.0, help="steady-state CPU window, s")
    p.add_argument("--timeout", type=float, default=3600.0, help="per phase, s")
    p.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    args = p.parse_args(argv)
    command = "python bench/operator_scale.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = REPO / ".cache" / "bench-operator" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    with session_cluster() as kube:
        res = run(args, kube, out)
    print(table(res))
    if args.record:
        record(res, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
