"""The agent's Node objects: registration with GPU capacity, lease and Ready heartbeats."""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import threading

from kubernetes import client

log = logging.getLogger("nodeagent.node")

LABEL = "loraplane.io/node-agent"
LEASE_SECONDS = 40


def micro_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _memory() -> str:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return f"{line.split()[1]}Ki"
    return "16Gi"


def conditions(heartbeat: str, transition: bool = True) -> list[dict]:
    """Healthy node conditions; a heartbeat leaves lastTransitionTime as it was."""

    def cond(ctype: str, status: str, reason: str, message: str) -> dict:
        out = {
            "type": ctype,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": heartbeat,
        }
        if transition:
            out["lastTransitionTime"] = heartbeat
        return out

    return [
        cond(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "node agent has sufficient memory",
        ),
        cond(
            "DiskPressure", "False", "KubeletHasNoDiskPressure", "node agent has no disk pressure"
        ),
        cond("PIDPressure", "False", "KubeletHasSufficientPID", "node agent has sufficient PID"),
        cond("Ready", "True", "KubeletReady", "node agent is posting ready status"),
    ]


def node_manifest(name: str, gpus: int, kubelet_version: str, kubelet_port: int = 0) -> dict:
    capacity = {
        "cpu": str(os.cpu_count() or 1),
        "memory": _memory(),
        "pods": "110",
        "ephemeral-storage": "100Gi",
        "nvidia.com/gpu": str(gpus),
    }
    stamp = now()
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                LABEL: "true",
                "nvidia.com/gpu.present": "true",
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {},
        "status": {
            "capacity": capacity,
            "allocatable": dict(capacity),
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "conditions": conditions(stamp),
            "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
            "nodeInfo": {
                "machineID": name,
                "systemUUID": name,
                "bootID": name,
                "kernelVersion": platform.release(),
                "osImage": "loraplane node agent (local processes)",
                "containerRuntimeVersion": "local-process://0.1",
                "kubeletVersion": kubelet_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        },
    }


class NodeKeeper(threading.Thread):
    """Registers the nodes, then renews each one's Lease and Ready condition."""

    def __init__(
        self,
        api: client.ApiClient,
        names: list[str],
        gpus: int,
        kubelet_version: str,
        stop: threading.Event,
        period: float = 10.0,
        kubelet_port: int = 0,
    ) -> None:
        super().__init__(name="node-keeper", daemon=True)
        self.core = client.CoreV1Api(api)
        self.coord = client.CoordinationV1Api(api)
        self.names, self.gpus, self.version = names, gpus, kubelet_version
        self.stop, self.period = stop, period
        self.kubelet_port = kubelet_port

    def register(self) -> None:
        for name in self.names:
            body = node_manifest(name, self.gpus, self.version, self.kubelet_port)
            try:
                self.core.create_node(body)
                log.info("registered node %s with %d GPUs", name, self.gpus)
            except client.ApiException as e:
                if e.status != 409:
                    raise
                self.core.patch_node(name, {"metadata": {"labels": body["metadata"]["labels"]}})
                self.core.patch_node_status(name, {"status": body["status"]})
                log.info("node %s already registered; status refreshed", name)
            self._renew(name)

    def run(self) -> None:
        while not self.stop.wait(self.period):
            for name in self.names:
                try:
                    self._renew(name)
                    self.core.patch_node_status(
                        name, {"status": {"conditions": conditions(now(), transition=False)}}
                    )
                except client.ApiException as e:
                    log.warning("node %s heartbeat failed: %s %s", name, e.status, e.reason)
                    if e.status == 404:  # someone deleted the Node: come back
                        self.register()
                except OSError as e:
                    log.warning("node %s heartbeat failed: %s", name, e)

    def _renew(self, name: str) -> None:
        spec = {
            "holderIdentity": name,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": micro_now(),
        }
        try:
            self.coord.patch_namespaced_lease(name, "kube-node-lease", {"spec": spec})
        except client.ApiException as e:
            if e.status != 404:
                raise
            node = self.core.read_node(name)
            self.coord.create_namespaced_lease(
                "kube-node-lease",
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {
                        "name": name,
                        "ownerReferences": [
                            {
                                "apiVersion": "v1",
                                "kind": "Node",
                                "name": name,
                                "uid": node.metadata.uid,
                            }
                        ],
                    },
                    "spec": spec,
                },
            )
