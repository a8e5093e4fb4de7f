"""Test helpers for a real cluster: the local control plane or whatever KUBECONFIG names.

Pytest fixtures built on these live in tests/cluster/conftest.py; the e2e suite imports the
same helpers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .controlplane import ControlPlane, tail
from .paths import REPO, Bins

T = TypeVar("T")


class Timeout(AssertionError):
    pass


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll `check` until it returns something truthy; fail saying what never happened."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # the next poll may succeed; keep the reason for the failure
            last_error = e
        if time.monotonic() > deadline:
            why = f" (last error: {last_error})" if last_error else ""
            raise Timeout(f"timed out after {timeout:.0f}s waiting for {what}{why}")
        time.sleep(interval)


def is_ready(obj: dict) -> bool:
    """Whether a Pod's or a Node's Ready condition is True."""
    conds = obj.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


@dataclass
class Kube:
    """A cluster as tests see it: kubectl, the Python client, and where logs are."""

    kubeconfig: Path
    kubectl_bin: Path
    local: ControlPlane | None = None  # set when this is our local control plane
    _api: Any = field(default=None, repr=False)

    @property
    def api(self):
        if self._api is None:
            from kubernetes import config

            self._api = config.new_client_from_config(config_file=str(self.kubeconfig))
        return self._api

    @property
    def core(self):
        from kubernetes import client

        return client.CoreV1Api(self.api)

    @property
    def apps(self):
        from kubernetes import client

        return client.AppsV1Api(self.api)

    @property
    def custom(self):
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.kubectl_bin), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
            )
        return proc

    def get_json(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    # -- diagnostics for a failing test --------------------------------------------------
    def explain(self, namespace: str) -> str:
        """Events, pods and the logs of the namespace's pods (and of the control plane)."""
        parts = []
        for args in (
            ("get", "events", "-n", namespace, "--sort-by=.lastTimestamp"),
            ("get", "all,loraplane", "-n", namespace, "-o", "wide"),
        ):
            proc = self.kubectl(*args, check=False)
            parts.append(f"$ kubectl {' '.join(args)}\n{proc.stdout}{proc.stderr}")
        if self.local is not None:
            pods = self.local.state / "agent" / "pods"
            for log in sorted(pods.glob(f"{namespace}_*/*.log")):
                parts.append(f"--- {log.relative_to(pods)} ---\n{tail(log, 30)}")
            for component in ("nodeagent", "kube-controller-manager", "kube-apiserver"):
                parts.append(
                    f"--- {component}.log (tail) ---\n{tail(self.local.log(component), 15)}"
                )
        return "\n".join(parts)


# -- sessions sharing one local cluster ----------------------------------------------------
def _live_users(users: Path) -> list[Path]:
    live = []
    for f in users.glob("*"):
        pid = int(f.name) if f.name.isdigit() else -1
        if pid > 0 and Path(f"/proc/{pid}").exists():
            live.append(f)
        else:
            f.unlink(missing_ok=True)
    return live


@contextlib.contextmanager
def session_cluster() -> Iterator[Kube]:
    """A cluster for one test session.

    LORAPLANE_USE_KUBECONFIG=1 uses KUBECONFIG (kind, a real cluster) and touches nothing
    else. Otherwise the local control plane: started if it is not running, and stopped at
    the end by the last test session using it, but only if a test session started it (a
    cluster from `make cluster-up` stays up).
    """
    if os.environ.get("LORAPLANE_USE_KUBECONFIG") == "1":
        path = Path(os.environ.get("KUBECONFIG") or Path.home() / ".kube" / "config")
        kubectl = Path(shutil.which("kubectl") or Bins.default().kubectl)
        yield Kube(path, kubectl)
        return
    cp = ControlPlane()
    missing = cp.bins.missing()
    if missing:
        raise RuntimeError(
            f"the local control plane is not built ({missing[0]} missing): "
            f"run `make cluster-bins` in {REPO}"
        )
    users, marker = cp.state / "users", cp.state / "started-by-tests"
    with cp.lock():
        if not (cp.ready() and all(cp.running().values())):
            cp.up()
            marker.touch()
        users.mkdir(parents=True, exist_ok=True)
        me = users / str(os.getpid())
        me.touch()
    try:
        yield Kube(cp.kubeconfig(), cp.bins.kubectl, local=cp)
    finally:
        with cp.lock():
            me.unlink(missing_ok=True)
            if marker.exists() and not _live_users(users):
                cp.down()
                marker.unlink(missing_ok=True)


def new_namespace(kube: Kube, prefix: str) -> str:
    """A namespace named by generateName, ready for pods (its default ServiceAccount exists)."""
    from kubernetes import client

    body = {"metadata": {"generateName": prefix, "labels": {"loraplane.io/test": "true"}}}
    name = kube.core.create_namespace(body).metadata.name

    def has_default_sa() -> bool:
        try:
            return bool(kube.core.read_namespaced_service_account("default", name))
        except client.ApiException as e:
            if e.status == 404:
                return False
            raise

    wait_for(has_default_sa, 30, f"the default ServiceAccount in namespace {name}", interval=0.1)
    return name


def delete_namespace(kube: Kube, name: str) -> None:
    """Start deleting; the namespace controller finishes while the next test runs."""
    from kubernetes import client

    try:
        kube.core.delete_namespace(name)
    except client.ApiException as e:
        if e.status != 404:
            raise


def namespace_prefix(nodeid: str) -> str:
    """A DNS-safe generateName prefix from a pytest node id."""
    name = nodeid.rsplit("::", 1)[-1].split("[")[0].lower().replace("_", "-")
    name = "".join(ch for ch in name if ch.isalnum() or ch == "-").strip("-")
    return (name[:40].rstrip("-") or "test") + "-"


KWOK_ANNOTATION = {"kwok.x-k8s.io/node": "fake"}
KWOK_TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}
KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}


KWOK_SET = "loraplane.io/kwok-set"  # label naming the group a node was made in


def kwok_node(name: str, gpus: int = 8, group: str = "default") -> dict:
    """A fake GPU node that kwok keeps Ready and whose pods it marks Running, without processes.

    Its InternalIP and its pods' IPs are fake: never dial them.
    """
    capacity = {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": dict(KWOK_ANNOTATION),
            "labels": {
                "type": "kwok",
                KWOK_SET: group,
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "nvidia.com/gpu.present": "true",
            },
        },
        # Only pods that tolerate this land here: a pod meant to really run never does.
        "spec": {"taints": [KWOK_TAINT]},
        # Status is kept on create; kwok's node-initialize stage copies it forward.
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
        },
    }


@contextlib.contextmanager
def kwok_nodes(kube: Kube, prefix: str, count: int, gpus: int = 8) -> Iterator[list[str]]:
    """`count` fake GPU nodes for the duration of the block, deleted afterwards. They carry
    the label KWOK_SET=<prefix without its trailing dash>: select it so pods land only on
    these, not on another test session's kwok nodes."""
    names = [f"{prefix}{i}" for i in range(count)]
    group = prefix.rstrip("-")
    items = [kwok_node(n, gpus, group) for n in names]
    body = {"apiVersion": "v1", "kind": "List", "items": items}
    kube.kubectl("create", "-f", "-", input=json.dumps(body))
    try:
        yield names
    finally:
        kube.kubectl("delete", "node", *names, "--wait=false", check=False)


def service_url(
    get_json: Callable[..., dict], namespace: str, service: str, pod_selector: str
) -> str | None:
    """http://address:port of a ready backend of a Service, as its EndpointSlice gives it (as any
    in-cluster client's would); where pods have loopback addresses, which EndpointSlices
    refuse, a ready pod's own address from the selector. get_json(*kubectl get args)."""
    slices = get_json(
        "endpointslices", "-n", namespace, "-l", f"kubernetes.io/service-name={service}"
    )
    for s in slices["items"]:
        port = next((p["port"] for p in s.get("ports") or [] if p.get("port")), None)
        for ep in s.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready") and port:
                return f"http://{ep['addresses'][0]}:{port}"
    for pod in get_json("pods", "-n", namespace, "-l", pod_selector)["items"]:
        ip = pod["status"].get("podIP")
        if is_ready(pod) and ip and not pod["metadata"].get("deletionTimestamp"):
            return f"http://{ip}:{pod['spec']['containers'][0]['ports'][0]['containerPort']}"
    return None
