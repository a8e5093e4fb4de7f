"""One pod on a node: its loopback address, its ServiceAccount token, its containers as
processes, and its status, from the moment it is bound until it is gone."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from kubernetes import client

from .container import Container, rfc3339
from .envvars import EnvError, EnvResolver

log = logging.getLogger("nodeagent.pod")
TICK = 0.25  # seconds between looks at processes and probes


class PodWorker(threading.Thread):
    def __init__(self, agent, pod: client.V1Pod, ip: str) -> None:
        super().__init__(name=f"pod-{pod.metadata.namespace}/{pod.metadata.name}", daemon=True)
        self.agent = agent
        self.core: client.CoreV1Api = agent.core
        self.pod = pod
        self.uid: str = pod.metadata.uid
        self.ip = ip
        self.dir: Path = (
            agent.state_dir
            / "pods"
            / f"{pod.metadata.namespace}_{pod.metadata.name}_{self.uid[:8]}"
        )
        pids = agent.state_dir / "pids"
        self.init_containers = [
            Container(c, self.dir / f"{c.name}.log", pids / f"{self.uid}-{c.name}.pid", init=True)
            for c in pod.spec.init_containers or []
        ]
        self.containers = [
            Container(c, self.dir / f"{c.name}.log", pids / f"{self.uid}-{c.name}.pid")
            for c in pod.spec.containers
        ]
        self.gone = threading.Event()  # the pod object no longer exists
        self.shutdown = threading.Event()  # the agent is stopping: stop processes, keep the pod
        self.kubeconfig: Path | None = None
        self.started_at = rfc3339()
        self.conditions: dict[str, dict] = {}
        self._last_status: str = ""

    # -- called from the watch thread ----------------------------------------------------
    def update(self, pod: client.V1Pod) -> None:
        self.pod = pod

    @property
    def name(self) -> str:
        return f"{self.pod.metadata.namespace}/{self.pod.metadata.name}"

    # -- the worker's loop ---------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod %s: worker failed", self.name)
        finally:
            for c in self.init_containers + self.containers:
                c.stop(grace=0)
            self.agent.forget(self)

    def _run(self) -> None:
        while not (self.gone.is_set() or self.shutdown.is_set()):
            if self.pod.metadata.deletion_timestamp is not None:
                self._terminate()
                return
            try:
                self._step()
                self._sync_status()
            except client.ApiException as e:
                if e.status == 404:
                    return
                log.warning("pod %s: API error %s: %s", self.name, e.status, e.reason)
            time.sleep(TICK)
        grace = 0 if self.gone.is_set() else self.agent.shutdown_grace
        for c in self.containers + self.init_containers:
            c.stop(grace=grace)

    def _step(self) -> None:
        for c in self.init_containers:
            if c.terminated is not None and c.terminated["exitCode"] == 0 and not c.running:
                continue  # done
            self._drive(c)
            return  # init containers run one at a time, in order, before the others
        for c in self.containers:
            self._drive(c)
            reason = c.run_probes(self.ip)
            if reason is not None:
                log.info("pod %s container %s: %s; restarting", self.name, c.name, reason)
                c.stop(grace=termination_grace(self.pod))
                self._after_exit(c)

    def _drive(self, c: Container) -> None:
        """Start the container when it should run; notice when it exits."""
        if c.running:
            return
        if c.proc is not None:  # exited since the last look
            c.reap()
            self._after_exit(c)
        if c.proc is None and c.waiting is not None and time.monotonic() >= c.restart_at:
            self._start(c)

    def _after_exit(self, c: Container) -> None:
        """Decide by the restart policy whether an exited container comes back, and when."""
        term = c.terminated
        if term is None:
            return
        policy = self.pod.spec.restart_policy or "Always"
        if c.init:
            restart = term["exitCode"] != 0 and policy != "Never"
        else:
            restart = policy == "Always" or (policy == "OnFailure" and term["exitCode"] != 0)
        if not restart:
            return
        c.last_terminated = term
        c.restart_count += 1
        delay = c.backoff.next()
        c.restart_at = time.monotonic() + delay
        c.waiting = (
            "CrashLoopBackOff",
            f"back-off {delay:.0f}s restarting failed container={c.name} pod={self.pod.metadata.name}",
        )
        self.agent.event(
            self.pod, "Warning", "BackOff", f"Back-off restarting failed container {c.name}"
        )

    def _start(self, c: Container) -> None:
        try:
            env = self._env(c)
            c.start(env, cwd=self.dir / "work")
        except EnvError as e:
            c.waiting = ("CreateContainerConfigError", str(e))
            c.restart_at = time.monotonic() + 2
            return
        except (ValueError, OSError) as e:
            c.waiting = ("CreateContainerError", str(e))
            c.restart_at = time.monotonic() + 5
            return
        log.info(
            "pod %s container %s started (pid %s) on %s", self.name, c.name, c.proc.pid, self.ip
        )
        self.agent.event(self.pod, "Normal", "Started", f"Started container {c.name} on {self.ip}")

    def _env(self, c: Container) -> dict[str, str]:
        # What an image would provide: a PATH that finds this repo's venv first, so
        # `python -m loraplane...` in a pod runs the code under test.
        base_path = os.pathsep.join(
            [str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")]
        )
        env = {
            "PATH": base_path,
            "HOME": os.environ.get("HOME", "/tmp"),
            "HOSTNAME": self.pod.metadata.name,
        }
        for key in ("LANG", "LC_ALL", "TMPDIR", "LORAPLANE_CACHE"):
            if key in os.environ:
                env[key] = os.environ[key]
        kubeconfig = self._service_account_kubeconfig()
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        resolver = EnvResolver(self.core, self.pod, self.ip, self.agent.host_ip)
        env.update(resolver.container_env(c.spec))
        return env

    def _service_account_kubeconfig(self) -> Path | None:
        """The pod's ServiceAccount identity as a kubeconfig: a bound token from TokenRequest,
        so the process authenticates as system:serviceaccount:<ns>:<sa>, like in a cluster."""
        spec = self.pod.spec
        if spec.automount_service_account_token is False:
            return None
        if self.kubeconfig is not None and self.kubeconfig.exists():
            return self.kubeconfig
        sa = spec.service_account_name or "default"
        req = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=[],
                expiration_seconds=self.agent.token_seconds,
                bound_object_ref=client.V1BoundObjectReference(
                    api_version="v1", kind="Pod", name=self.pod.metadata.name, uid=self.uid
                ),
            )
        )
        try:
            resp = self.core.create_namespaced_service_account_token(
                sa, self.pod.metadata.namespace, req
            )
        except client.ApiException as e:
            raise EnvError(
                f"TokenRequest for ServiceAccount {sa} failed: {e.status} {e.reason}"
            ) from e
        path = self.dir / "kubeconfig"
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "cluster",
                    "cluster": {
                        "server": self.agent.server,
                        "certificate-authority-data": self.agent.ca_data,
                    },
                }
            ],
            "users": [{"name": sa, "user": {"token": resp.status.token}}],
            "contexts": [
                {
                    "name": "pod",
                    "context": {
                        "cluster": "cluster",
                        "user": sa,
                        "namespace": self.pod.metadata.namespace,
                    },
                }
            ],
            "current-context": "pod",
        }
        path.write_text(json.dumps(cfg, indent=2))
        path.chmod(0o600)
        self.kubeconfig = path
        return path

    # -- status --------------------------------------------------------------------------
    def _phase(self) -> str:
        def done(c: Container) -> bool:  # exited and will not run again
            return c.proc is None and c.waiting is None and c.terminated is not None

        if not all(done(c) and c.terminated["exitCode"] == 0 for c in self.init_containers):
            failed = any(done(c) and c.terminated["exitCode"] != 0 for c in self.init_containers)
            return "Failed" if failed else "Pending"
        if all(done(c) for c in self.containers):
            ok = all(c.terminated["exitCode"] == 0 for c in self.containers)
            return "Succeeded" if ok else "Failed"
        if all(c.running or c.restart_count or c.terminated for c in self.containers):
            return "Running"
        return "Pending"

    def _condition(self, ctype: str, ok: bool, reason: str = "") -> dict:
        status = "True" if ok else "False"
        old = self.conditions.get(ctype)
        if old is None or old["status"] != status:
            old = {
                "type": ctype,
                "status": status,
                "lastProbeTime": None,
                "lastTransitionTime": rfc3339(),
            }
            if reason and not ok:
                old["reason"] = reason
            self.conditions[ctype] = old
        return old

    def _gates_ok(self) -> bool:
        conds = (
            {c.type: c.status for c in (self.pod.status.conditions or [])}
            if self.pod.status
            else {}
        )
        return all(
            conds.get(g.condition_type) == "True" for g in self.pod.spec.readiness_gates or []
        )

    def status(self) -> dict:
        init_done = all(
            c.terminated and c.terminated["exitCode"] == 0 for c in self.init_containers
        )
        ready = all(c.ready for c in self.containers)
        image = {
            c.name: c.image or ""
            for c in self.pod.spec.containers + (self.pod.spec.init_containers or [])
        }
        conds = [
            self._condition("PodReadyToStartContainers", True),
            self._condition("Initialized", init_done, "ContainersNotInitialized"),
            self._condition("ContainersReady", ready, "ContainersNotReady"),
            self._condition("Ready", ready and self._gates_ok(), "ContainersNotReady"),
        ]
        out = {
            "phase": self._phase(),
            "conditions": conds,
            "hostIP": self.agent.host_ip,
            "hostIPs": [{"ip": self.agent.host_ip}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.started_at,
            "containerStatuses": [c.status(image[c.name]) for c in self.containers],
        }
        if self.init_containers:
            out["initContainerStatuses"] = [c.status(image[c.name]) for c in self.init_containers]
        return out

    def _sync_status(self) -> None:
        body = self.status()
        text = json.dumps(body, sort_keys=True)
        if text == self._last_status:
            return
        self.core.patch_namespaced_pod_status(
            self.pod.metadata.name, self.pod.metadata.namespace, {"status": body}
        )
        self._last_status = text

    # -- deletion ------------------------------------------------------------------------
    def _terminate(self) -> None:
        grace = self.pod.metadata.deletion_grace_period_seconds
        grace = termination_grace(self.pod) if grace is None else float(grace)
        log.info("pod %s: deleting, SIGTERM with %.0fs grace", self.name, grace)
        for c in self.containers + self.init_containers:
            c.stop(grace=grace, cut_short=self.shutdown)
        with contextlib.suppress(client.ApiException):
            self._sync_status()
        try:
            self.core.delete_namespaced_pod(
                self.pod.metadata.name,
                self.pod.metadata.namespace,
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=self.uid)
                ),
            )
        except client.ApiException as e:
            if e.status not in (404, 409):
                raise


def termination_grace(pod: client.V1Pod) -> float:
    """The pod's grace period in seconds: 0 is a real value (stop at once), unset is 30."""
    grace = pod.spec.termination_grace_period_seconds
    return 30.0 if grace is None else float(grace)
