"""Bring the local control plane up and down: etcd, kube-apiserver, controller-manager,
scheduler, kwok and the node agent, all on 127.0.0.1, state under .cache/cluster/."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from . import chart, podnet, procs
from .paths import REPO, Bins, state_dir
from .pki import ensure_pki

# Preferred ports, away from the usual 2379/6443/10250 so a real cluster or another tool on
# the machine keeps its own; when any is taken (a second clone's cluster), all are picked free.
PREFERRED = {
    "etcd": 23790,
    "etcd_peer": 23791,
    "apiserver": 26443,
    "controller_manager": 26257,
    "scheduler": 26259,
    "kwok": 26280,
}
# Stop order; start order is the reverse.
COMPONENTS = (
    "nodeagent",
    "kwok",
    "kube-scheduler",
    "kube-controller-manager",
    "kube-apiserver",
    "etcd",
)


@dataclass
class Ports:
    etcd: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int


class ClusterError(RuntimeError):
    pass


class ControlPlane:
    def __init__(self, state: Path | None = None, bins: Bins | None = None) -> None:
        self.state = state or state_dir()
        self.bins = bins or Bins.default()
        self.pki = self.state / "pki"
        self.logs = self.state / "logs"
        self.pids = self.state / "pids"

    # -- paths a caller wants ------------------------------------------------------------
    def kubeconfig(self, user: str = "admin") -> Path:
        return self.state / f"{user}.kubeconfig"

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    @property
    def ports(self) -> Ports:
        return Ports(**json.loads((self.state / "ports.json").read_text()))

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One up or down at a time per state folder (test sessions and the CLI share it)."""
        self.state.mkdir(parents=True, exist_ok=True)
        with open(self.state / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    # -- status -------------------------------------------------------------------------
    def running(self) -> dict[str, int | None]:
        return {c: procs.running(self.pids / f"{c}.pid") for c in COMPONENTS}

    def ready(self) -> bool:
        try:
            return self._get("/readyz") == "ok"
        except (OSError, ValueError, ssl.SSLError):
            return False

    def _get(self, path: str, timeout: float = 3.0) -> str:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        with urllib.request.urlopen(self.server + path, context=ctx, timeout=timeout) as resp:
            return resp.read().decode()

    # -- up -----------------------------------------------------------------------------
    def up(
        self, *, kwok: bool = True, agent_nodes: int = 1, gpus: int = 8, timeout: float = 120.0
    ) -> None:
        missing = self.bins.missing()
        if missing:
            raise ClusterError(
                f"binaries missing: {', '.join(map(str, missing))}; "
                "run `make cluster-bins` (e2e/cluster/build.sh) first"
            )
        wanted = {"nodeagent": agent_nodes > 0, "kwok": kwok}
        alive = self.running()
        needed = [c for c in COMPONENTS if wanted.get(c, True)]
        if all(alive[c] for c in needed) and self.ready():
            chart.apply_operator_rbac(self)  # the chart may have changed since
            return  # idempotent: already up
        if any(alive.values()):
            self.down(wipe=False)  # half up (a crash): restart everything cleanly
        self.state.mkdir(parents=True, exist_ok=True)
        self._choose_ports()
        nets = podnet.setup(self.state, key=f"{self.state}|{self.server}")
        ensure_pki(self.pki)
        self._write_kubeconfigs()
        deadline = time.monotonic() + timeout
        try:
            self._start_etcd(deadline)
            self._start_apiserver(deadline)
            self._start_controllers()
            chart.apply_operator_rbac(self)
            if kwok:
                self._start_kwok(nets.kwok)
            if agent_nodes:
                self._start_agent(agent_nodes, gpus, nets.pods)
            self._wait_settled(deadline, agent_nodes)
        except BaseException:
            self.down(wipe=False)
            raise

    def _choose_ports(self) -> None:
        path = self.state / "ports.json"
        ports = dict(PREFERRED)
        if not all(_free(p) for p in ports.values()):
            ports = {k: _any_free_port() for k in ports}
        path.write_text(json.dumps(ports, indent=1) + "\n")

    def _write_kubeconfigs(self) -> None:
        ca = (self.pki / "ca.crt").read_bytes()
        for user, cert in (
            ("admin", "admin"),
            ("operator", "operator"),
            ("controller-manager", "controller-manager"),
            ("scheduler", "scheduler"),
        ):
            crt = (self.pki / f"{cert}.crt").read_bytes()
            key = (self.pki / f"{cert}.key").read_bytes()
            write_kubeconfig(
                self.kubeconfig(user),
                self.server,
                ca,
                user,
                {"client-certificate-data": _b64(crt), "client-key-data": _b64(key)},
            )

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = self.log(name)
        log.unlink(missing_ok=True)  # one run per file: what a failing test prints is this run's
        procs.spawn(argv, log, self.pids / f"{name}.pid", env=env)

    def _start_etcd(self, deadline: float) -> None:
        p = self.ports
        data = self.state / "etcd-data"
        self._spawn(
            "etcd",
            [
                str(self.bins.etcd),
                "--name=n0",
                f"--data-dir={data}",
                f"--listen-client-urls=http://127.0.0.1:{p.etcd}",
                f"--advertise-client-urls=http://127.0.0.1:{p.etcd}",
                f"--listen-peer-urls=http://127.0.0.1:{p.etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{p.etcd_peer}",
                f"--initial-cluster=n0=http://127.0.0.1:{p.etcd_peer}",
                "--listen-metrics-urls=",
                "--unsafe-no-fsync",
                "--quota-backend-bytes=4294967296",
                "--log-level=warn",
            ],
        )
        self._wait("etcd", deadline, lambda: _http_ok(f"http://127.0.0.1:{p.etcd}/health"))

    def _start_apiserver(self, deadline: float) -> None:
        p, k = self.ports, self.pki
        self._spawn(
            "kube-apiserver",
            [
                str(self.bins.k8s("kube-apiserver")),
                f"--etcd-servers=http://127.0.0.1:{p.etcd}",
                "--bind-address=127.0.0.1",
                f"--secure-port={p.apiserver}",
                # A loopback bind has no default-route address to advertise; a loopback advertise
                # address fails the `kubernetes` Endpoints validation, so skip that reconciler.
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
                f"--tls-cert-file={k / 'apiserver.crt'}",
                f"--tls-private-key-file={k / 'apiserver.key'}",
                f"--client-ca-file={k / 'ca.crt'}",
                f"--kubelet-client-certificate={k / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={k / 'apiserver-kubelet-client.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={k / 'sa.pub'}",
                f"--service-account-signing-key-file={k / 'sa.key'}",
                "--service-cluster-ip-range=10.96.0.0/16",
                # Reach kubelets (the agent, kwok) only by their InternalIP, 127.0.0.1: never by a
                # hostname that would need DNS.
                "--kubelet-preferred-address-types=InternalIP",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
        )
        self._wait("kube-apiserver", deadline, self.ready)

    def _start_controllers(self) -> None:
        p, k = self.ports, self.pki
        cm = self.kubeconfig("controller-manager")
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bins.k8s("kube-controller-manager")),
                f"--kubeconfig={cm}",
                f"--authentication-kubeconfig={cm}",
                f"--authorization-kubeconfig={cm}",
                "--bind-address=127.0.0.1",
                f"--secure-port={p.controller_manager}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={k / 'sa.key'}",
                f"--root-ca-file={k / 'ca.crt'}",
                "--controllers=*",
                # The default 20 QPS caps kwok scale tests at ~20 pods/s.
                "--kube-api-qps=100",
                "--kube-api-burst=200",
                "--v=1",
            ],
        )
        sc = self.kubeconfig("scheduler")
        self._spawn(
            "kube-scheduler",
            [
                str(self.bins.k8s("kube-scheduler")),
                f"--kubeconfig={sc}",
                f"--authentication-kubeconfig={sc}",
                f"--authorization-kubeconfig={sc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={p.scheduler}",
                "--leader-elect=false",
                "--kube-api-qps=100",
                "--kube-api-burst=200",
                "--v=1",
            ],
        )

    def _start_kwok(self, net: podnet.PodNetwork) -> None:
        self._spawn(
            "kwok",
            [
                str(self.bins.kwok),
                f"--kubeconfig={self.kubeconfig()}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                # Fake pod IPs: this clone's own range (routed to lo as root, so a simulated
                # runtime can listen on them), else one nobody routes.
                f"--cidr={net.cidr}",
                "--node-ip=127.0.0.1",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{self.ports.kwok}",
                f"--config={self.bins.kwok_stages}",
            ],
        )

    def _start_agent(self, nodes: int, gpus: int, net: podnet.PodNetwork) -> None:
        python = _python()
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self._spawn(
            "nodeagent",
            [
                python,
                "-m",
                "e2e.nodeagent",
                f"--kubeconfig={self.kubeconfig()}",
                f"--nodes={nodes}",
                f"--gpus={gpus}",
                f"--state-dir={self.state / 'agent'}",
                f"--serving-cert={self.pki / 'nodeagent.crt'}",
                f"--serving-key={self.pki / 'nodeagent.key'}",
                f"--pod-cidr={net.cidr}",
            ],
            env=env,
        )

    def _wait_settled(self, deadline: float, agent_nodes: int) -> None:
        """Until the cluster can take a pod: default ServiceAccount and the agent's nodes Ready."""

        def settled() -> bool:
            if not self._exists("/api/v1/namespaces/default/serviceaccounts/default"):
                return False
            if not agent_nodes:
                return True
            nodes = json.loads(self._get("/api/v1/nodes?labelSelector=loraplane.io/node-agent"))
            ready = [n for n in nodes["items"] if _node_ready(n)]
            return len(ready) >= agent_nodes

        self._wait("cluster settle (default ServiceAccount, agent nodes Ready)", deadline, settled)

    def _exists(self, path: str) -> bool:
        try:
            self._get(path)
            return True
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return False
            raise

    def _wait(self, what: str, deadline: float, check) -> None:
        while True:
            dead = [
                c
                for c, pid in self.running().items()
                if pid is None and (self.pids / f"{c}.pid").exists()
            ]
            if dead:
                raise ClusterError(
                    f"{dead[0]} exited while waiting for {what}; "
                    f"its log:\n{tail(self.log(dead[0]))}"
                )
            try:
                if check():
                    return
            except (OSError, ValueError, ssl.SSLError):
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}; logs in {self.logs}")
            time.sleep(0.25)

    def kubectl(
        self, *args: str, user: str = "admin", check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.bins.kubectl), f"--kubeconfig={self.kubeconfig(user)}", *args],
            capture_output=True,
            text=True,
            input=input,
        )
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    # -- down ---------------------------------------------------------------------------
    def down(self, wipe: bool = True) -> list[str]:
        """Stop every component (the agent stops its pods first); wipe etcd data by default so
        the next `up` starts from an empty cluster."""
        stopped = [c for c in COMPONENTS if procs.stop(self.pids / f"{c}.pid", grace=15)]
        # Pods of an agent that died without cleaning up (SIGKILL, OOM) are still ours.
        for pidfile in sorted((self.state / "agent" / "pids").glob("*.pid")):
            procs.stop(pidfile, grace=2)
        podnet.teardown(self.state)  # no pod is left on it
        if wipe:
            _rmtree(self.state / "etcd-data")
        return stopped

    def status(self) -> dict[str, object]:
        out: dict[str, object] = {"state": str(self.state), "ready": False}
        out["processes"] = self.running()
        if (self.state / "ports.json").exists():
            out["ports"] = asdict(self.ports)
            out["ready"] = self.ready()
            out["kubeconfig"] = str(self.kubeconfig())
        nets = podnet.load(self.state)
        if nets is not None:
            for name, net in (("pod_network", nets.pods), ("kwok_network", nets.kwok)):
                out[name] = {
                    "cidr": net.cidr,
                    "routed": net.routed,  # for pods: Services over them have endpoints
                    **({"why_not_routed": net.reason} if net.reason else {}),
                }
        return out

    def pod_network(self) -> podnet.PodNetwork | None:
        """Where agent pods' addresses come from; None for a cluster started before pod
        networks existed."""
        nets = podnet.load(self.state)
        return nets.pods if nets else None


def write_kubeconfig(path: Path, server: str, ca: bytes, user: str, creds: dict[str, str]) -> None:
    # JSON is YAML, and needs no YAML library in whichever Python runs this.
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "clusters": [
            {
                "name": "loraplane-local",
                "cluster": {"server": server, "certificate-authority-data": _b64(ca)},
            }
        ],
        "users": [{"name": user, "user": creds}],
        "contexts": [
            {
                "name": f"{user}@loraplane-local",
                "context": {"cluster": "loraplane-local", "user": user},
            }
        ],
        "current-context": f"{user}@loraplane-local",
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _node_ready(node: dict) -> bool:
    conds = node.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _free(port: int) -> bool:
    with socket.socket() as s:
        # As the servers do: a port whose old connections linger in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _any_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.status == 200


def _python() -> str:
    """The node agent needs the kubernetes client: the repo's venv, else this interpreter."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
