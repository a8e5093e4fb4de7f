"""One container of a pod as a local process: start, watch, probe, restart, stop."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client

from .probes import ProbeState, probe_once


def rfc3339(t: float | None = None) -> str:
    when = dt.datetime.fromtimestamp(t if t is not None else time.time(), dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Backoff:
    """CrashLoopBackOff: the kubelet's doubling delay, shortened for local runs."""

    initial: float = 1.0
    cap: float = 30.0
    delay: float = 0.0

    def next(self) -> float:
        self.delay = self.initial if self.delay == 0 else min(self.delay * 2, self.cap)
        return self.delay


@dataclass
class Container:
    spec: client.V1Container
    log: Path
    pidfile: Path
    init: bool = False
    proc: subprocess.Popen[bytes] | None = None
    started_wall: float | None = None
    started_mono: float = 0.0
    restart_count: int = 0
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    terminated: dict | None = None  # the current state when it has exited for good
    last_terminated: dict | None = None
    restart_at: float = 0.0
    backoff: Backoff = field(default_factory=Backoff)
    readiness: ProbeState | None = None
    liveness: ProbeState | None = None
    startup: ProbeState | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def started(self) -> bool:
        """Past its startup probe (or running without one)."""
        return self.running and (self.startup is None or self.startup.result is True)

    @property
    def ready(self) -> bool:
        if not self.started:
            return False
        return self.readiness is None or self.readiness.result is True

    def argv(self, env: dict[str, str]) -> list[str]:
        from .envvars import expand

        command = [expand(c, env) for c in self.spec.command or []]
        args = [expand(a, env) for a in self.spec.args or []]
        if not command:
            raise ValueError(
                f"container {self.name} has no command; the node agent ignores images "
                "and can only run an explicit command that exists on this machine"
            )
        found = shutil.which(command[0], path=env.get("PATH"))
        if found is None:
            raise ValueError(
                f"container {self.name}: command {command[0]!r} not found on this machine"
            )
        return [found, *command[1:], *args]

    def start(self, env: dict[str, str], cwd: Path) -> None:
        argv = self.argv(env)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        workdir = Path(self.spec.working_dir) if self.spec.working_dir else cwd
        workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        from e2e.cluster.procs import start_time

        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.pidfile.write_text(f"{self.proc.pid} {start_time(self.proc.pid)}\n")
        self.env = env
        self.started_wall, self.started_mono = time.time(), time.monotonic()
        self.waiting, self.terminated = None, None
        self.readiness = self._probe(self.spec.readiness_probe)
        self.liveness = self._probe(self.spec.liveness_probe)
        self.startup = self._probe(self.spec.startup_probe)

    def _probe(self, probe: client.V1Probe | None) -> ProbeState | None:
        return None if probe is None else ProbeState(probe, self.started_mono)

    def run_probes(self, pod_ip: str) -> str | None:
        """Probe what is due; returns a reason to restart the container, if any."""
        now = time.monotonic()
        if not self.running:
            return None
        if self.startup is not None and self.startup.result is not True:
            if self.startup.due(now):
                self.startup.record(
                    *probe_once(self.startup.probe, self.spec, pod_ip, self.env), now
                )
            if self.startup.result is False:
                return f"startup probe failed: {self.startup.message}"
            if self.startup.result is not True:
                return None
        if self.liveness is not None and self.liveness.due(now):
            self.liveness.record(*probe_once(self.liveness.probe, self.spec, pod_ip, self.env), now)
            if self.liveness.result is False:
                return f"liveness probe failed: {self.liveness.message}"
        if self.readiness is not None and self.readiness.due(now):
            self.readiness.record(
                *probe_once(self.readiness.probe, self.spec, pod_ip, self.env), now
            )
        return None

    def reap(self) -> dict | None:
        """If the process has exited, record its termination and return it."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        # A signal shows as a negative return code; Kubernetes reports 128 + signal.
        exit_code = 128 - code if code < 0 else code
        term = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": rfc3339(self.started_wall),
            "finishedAt": rfc3339(),
            "containerID": self.container_id,
        }
        self.proc = None
        self.pidfile.unlink(missing_ok=True)
        self.terminated = term
        self.readiness = self.liveness = self.startup = None
        return term

    def stop(self, grace: float, cut_short: threading.Event | None = None) -> None:
        """SIGTERM to the container's process group, SIGKILL after the grace period (or as
        soon as `cut_short` is set: the agent itself is stopping)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            _killpg(self.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + max(grace, 0.0)
            while self.proc.poll() is None and time.monotonic() < deadline:
                if cut_short is not None and cut_short.is_set():
                    break
                time.sleep(0.05)
            if self.proc.poll() is None:
                _killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # Children the main process left behind in its group go too.
        _killpg(self.proc.pid, signal.SIGKILL)
        self.reap()

    @property
    def container_id(self) -> str:
        return f"local://{self.proc.pid}" if self.proc else ""

    def status(self, image: str) -> dict:
        if self.running:
            state: dict = {"running": {"startedAt": rfc3339(self.started_wall)}}
        elif self.terminated is not None and self.waiting is None:
            state = {"terminated": self.terminated}
        else:
            reason, message = self.waiting or ("ContainerCreating", "")
            state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        out = {
            "name": self.name,
            "image": image,
            "imageID": "",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
        }
        if self.running:
            out["containerID"] = self.container_id
        return out


def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
