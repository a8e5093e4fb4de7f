"""The node agent: watches the pods bound to its Nodes and gives each one a PodWorker."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import yaml
from kubernetes import client, config, watch

from e2e.cluster.podnet import fallback

from .ipam import Ipam
from .kubeletapi import KubeletAPI
from .node import NodeKeeper
from .node import now as node_now
from .pod import PodWorker

log = logging.getLogger("nodeagent")


@dataclass(frozen=True)
class AgentConfig:
    kubeconfig: Path
    state_dir: Path
    node_names: tuple[str, ...]
    gpus: int = 8
    kubelet_version: str = "v1.34.4"
    token_seconds: int = 24 * 3600
    shutdown_grace: float = 5.0  # per container when the agent itself stops
    serving_cert: Path | None = None  # for the kubelet API (`kubectl logs`); none: not served
    serving_key: Path | None = None
    pod_cidr: str | None = None  # a /16 for pod addresses; None: a 127.Y/16 of the API server

    def __post_init__(self) -> None:
        if not self.node_names:
            raise ValueError("the node agent needs at least one node name")
        if self.gpus < 0:
            raise ValueError(f"gpus must be >= 0, got {self.gpus}")


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.state_dir = cfg.state_dir
        self.shutdown_grace = cfg.shutdown_grace
        self.token_seconds = cfg.token_seconds
        self.api = config.new_client_from_config(config_file=str(cfg.kubeconfig))
        self.core = client.CoreV1Api(self.api)
        raw = yaml.safe_load(cfg.kubeconfig.read_text())
        cluster = raw["clusters"][0]["cluster"]
        self.server: str = cluster["server"]
        self.ca_data: str = cluster["certificate-authority-data"]
        self.host_ip = "127.0.0.1"
        # One range for all of this agent's nodes: pod IPs are unique across the cluster.
        self.ipam = Ipam(cfg.pod_cidr or fallback(self.server).cidr)
        self.workers: dict[str, PodWorker] = {}
        self.worker_node: dict[str, str] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------
    def run(self) -> None:
        port = 0
        if self.cfg.serving_cert and self.cfg.serving_key:
            api = KubeletAPI(self.cfg.serving_cert, self.cfg.serving_key, self.find_log, self.alive)
            api.start()
            port = api.port
        keeper = NodeKeeper(
            self.api,
            list(self.cfg.node_names),
            self.cfg.gpus,
            self.cfg.kubelet_version,
            self.stop,
            kubelet_port=port,
        )
        keeper.register()
        keeper.start()
        watchers = [
            threading.Thread(target=self._watch, args=(n,), name=f"watch-{n}", daemon=True)
            for n in self.cfg.node_names
        ]
        for t in watchers:
            t.start()
        log.info("node agent up: nodes %s", ", ".join(self.cfg.node_names))
        self.stop.wait()
        self._stop_workers()

    def _stop_workers(self) -> None:
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.shutdown.set()
        for w in workers:
            w.join(timeout=self.shutdown_grace + 10)
        log.info("node agent stopped %d pods", len(workers))

    # -- pods ----------------------------------------------------------------------------
    def _watch(self, node: str) -> None:
        selector = f"spec.nodeName={node}"
        while not self.stop.is_set():
            try:
                pods = self.core.list_pod_for_all_namespaces(field_selector=selector)
                listed = {p.metadata.uid for p in pods.items}
                for p in pods.items:
                    self._handle(node, p)
                with self.lock:
                    vanished = [
                        w
                        for uid, w in self.workers.items()
                        if self.worker_node[uid] == node and uid not in listed
                    ]
                for w in vanished:
                    w.gone.set()
                stream = watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=pods.metadata.resource_version,
                    timeout_seconds=60,
                )
                for ev in stream:
                    if self.stop.is_set():
                        return
                    pod = ev["object"]
                    if ev["type"] == "DELETED":
                        with self.lock:
                            w = self.workers.get(pod.metadata.uid)
                        if w is not None:
                            w.gone.set()
                    elif ev["type"] in ("ADDED", "MODIFIED"):
                        self._handle(node, pod)
            except client.ApiException as e:
                if e.status != 410:  # 410: our resourceVersion is too old; just list again
                    log.warning("watch of pods on %s: %s %s", node, e.status, e.reason)
                    self.stop.wait(1)
            except Exception:
                log.exception("watch of pods on %s failed; listing again", node)
                self.stop.wait(1)

    def _handle(self, node: str, pod: client.V1Pod) -> None:
        uid = pod.metadata.uid
        with self.lock:
            worker = self.workers.get(uid)
            if worker is not None:
                worker.update(pod)
                return
            finished = pod.status is not None and pod.status.phase in ("Succeeded", "Failed")
            if pod.metadata.deletion_timestamp is not None or finished:
                if pod.metadata.deletion_timestamp is not None:
                    self._finalize(pod)  # nothing runs for it here: let it go at once
                return
            ip = self.ipam.allocate()
            worker = PodWorker(self, pod, ip)
            self.workers[uid] = worker
            self.worker_node[uid] = node
        log.info(
            "pod %s/%s bound to %s: address %s", pod.metadata.namespace, pod.metadata.name, node, ip
        )
        worker.start()

    def _finalize(self, pod: client.V1Pod) -> None:
        try:
            self.core.delete_namespaced_pod(
                pod.metadata.name,
                pod.metadata.namespace,
                body=client.V1DeleteOptions(
                    grace_period_seconds=0,
                    preconditions=client.V1Preconditions(uid=pod.metadata.uid),
                ),
            )
        except client.ApiException as e:
            if e.status not in (404, 409):
                log.warning("finalizing pod %s: %s %s", pod.metadata.name, e.status, e.reason)

    def find_log(self, namespace: str, pod: str, container: str) -> Path | None:
        with self.lock:
            for w in self.workers.values():
                if w.pod.metadata.namespace == namespace and w.pod.metadata.name == pod:
                    return w.dir / f"{container}.log"
        # A pod that has finished: its newest log folder.
        found = sorted(
            self.state_dir.glob(f"pods/{namespace}_{pod}_*/{container}.log"),
            key=lambda p: p.stat().st_mtime,
        )
        return found[-1] if found else None

    def alive(self, namespace: str, pod: str) -> bool:
        with self.lock:
            return (
                any(
                    w.pod.metadata.namespace == namespace and w.pod.metadata.name == pod
                    for w in self.workers.values()
                )
                and not self.stop.is_set()
            )

    def forget(self, worker: PodWorker) -> None:
        with self.lock:
            self.workers.pop(worker.uid, None)
            known = self.worker_node.pop(worker.uid, None)
        if known is not None:
            self.ipam.release(worker.ip)

    def event(self, pod: client.V1Pod, etype: str, reason: str, message: str) -> None:
        """Best effort, like the kubelet's: an Event that cannot be written is not an error."""
        stamp = node_now()
        body = {
            "metadata": {
                "generateName": f"{pod.metadata.name}.",
                "namespace": pod.metadata.namespace,
            },
            "involvedObject": {
                "kind": "Pod",
                "apiVersion": "v1",
                "name": pod.metadata.name,
                "namespace": pod.metadata.namespace,
                "uid": pod.metadata.uid,
            },
            "type": etype,
            "reason": reason,
            "message": message,
            "source": {"component": "loraplane-nodeagent", "host": pod.spec.node_name},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "reportingComponent": "loraplane-nodeagent",
            "reportingInstance": pod.spec.node_name,
        }
        try:
            self.core.create_namespaced_event(pod.metadata.namespace, body)
        except (client.ApiException, OSError) as e:
            log.debug("event %s for %s not written: %s", reason, pod.metadata.name, e)
