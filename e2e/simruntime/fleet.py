"""Fleet: watches Nodes and Pods, and runs one simulated runtime on each kwok runtime pod's IP.

Level-based: every change marks a pod dirty, and one worker compares what should be served
(pods.serving_address) with what is, starting, stopping or restarting listeners to match.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from . import pods
from .config import SimConfig
from .kube import ApiError, Expired, Kube
from .routes import LocalRoutes
from .runtime import SimRuntime
from .server import create_app

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0  # a pod whose Secret or address is not there yet is looked at again
SECRET_TTL_SECONDS = 5.0
SHUTDOWN_SECONDS = 0.5  # requests in flight when a pod stops get this long


class NotYet(Exception):
    """The pod cannot be served yet (its Secret is missing, its IP unbindable): retry."""


@dataclass
class Served:
    ip: str
    port: int
    runner: web.AppRunner
    sim: SimRuntime
    restart_mark: str | None

    async def stop(self) -> None:
        await self.runner.cleanup()


class Fleet:
    def __init__(self, kube: Kube, config: SimConfig) -> None:
        self.kube = kube
        self.config = config
        self.routes = LocalRoutes(config.add_routes)
        self.kwok_nodes: set[str] = set()
        self.pods: dict[str, dict[str, Any]] = {}  # uid -> pod
        self.served: dict[str, Served] = {}  # uid -> its running simulated runtime
        self.secrets: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self.dirty: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._warned: set[str] = set()

    # -- main loop ------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self._inform("/api/v1/nodes", self._on_node, "nodes"))]
        for path in self._pod_paths():
            tasks.append(asyncio.create_task(self._inform(path, self._on_pod, "pods")))
        tasks.append(asyncio.create_task(self._work()))
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(s.stop() for s in self.served.values()))
            self.served.clear()
            self.routes.remove_all()

    def _pod_paths(self) -> list[str]:
        if not self.config.namespaces:
            return ["/api/v1/pods"]
        return [f"/api/v1/namespaces/{ns}/pods" for ns in self.config.namespaces]

    async def _inform(self, path: str, on_event: Callable[[str, dict], None], what: str) -> None:
        """List, then watch from the list's resourceVersion; list again when the watch expires
        or fails. Runs until cancelled."""
        backoff = 0.5
        while True:
            try:
                listing = await self.kube.get(path)
                on_event("SYNC", listing)
                rv = listing["metadata"]["resourceVersion"]
                while True:
                    async for event in self.kube.watch(path, rv):
                        rv = event["object"]["metadata"].get("resourceVersion", rv)
                        if event["type"] != "BOOKMARK":
                            on_event(event["type"], event["object"])
                    backoff = 0.5
            except Expired:
                continue
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                log.warning("watching %s failed (%s); again in %.1fs", what, e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    def _on_node(self, kind: str, obj: dict[str, Any]) -> None:
        before = set(self.kwok_nodes)
        if kind == "SYNC":
            self.kwok_nodes = {n["metadata"]["name"] for n in obj["items"] if pods.is_kwok_node(n)}
        elif kind == "DELETED" or not pods.is_kwok_node(obj):
            self.kwok_nodes.discard(obj["metadata"]["name"])
        else:
            self.kwok_nodes.add(obj["metadata"]["name"])
        changed = before ^ self.kwok_nodes
        if changed:
            for uid, pod in self.pods.items():
                if pod["spec"].get("nodeName") in changed:
                    self._mark(uid)

    def _on_pod(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "SYNC":
            listed = {}
            for p in obj["items"]:
                if pods.runtime_container(p, self.config.runtime_command) is not None:
                    listed[p["metadata"]["uid"]] = p
            gone = [
                uid
                for uid, p in self.pods.items()
                if uid not in listed and self._in_scope(p["metadata"]["namespace"])
            ]
            for uid in gone:
                del self.pods[uid]
            self.pods.update(listed)
            for uid in [*gone, *listed]:
                self._mark(uid)
            return
        if pods.runtime_container(obj, self.config.runtime_command) is None:
            return
        uid = obj["metadata"]["uid"]
        if kind == "DELETED":
            self.pods.pop(uid, None)
        else:
            self.pods[uid] = obj
        self._mark(uid)

    def _in_scope(self, namespace: str) -> bool:
        return not self.config.namespaces or namespace in self.config.namespaces

    def _mark(self, uid: str) -> None:
        if uid not in self._queued:
            self._queued.add(uid)
            self.dirty.put_nowait(uid)

    def _mark_later(self, uid: str) -> None:
        asyncio.get_running_loop().call_later(RETRY_SECONDS, self._mark, uid)

    async def _work(self) -> None:
        while True:
            uid = await self.dirty.get()
            self._queued.discard(uid)
            try:
                await self._sync(uid)
            except NotYet as e:
                if uid not in self._warned:
                    self._warned.add(uid)
                    log.warning("%s", e)
                self._mark_later(uid)
            except Exception:
                log.exception("syncing pod %s failed; retrying", uid)
                self._mark_later(uid)

    # -- one pod ---------------------------------------------------------------------------------
    async def _sync(self, uid: str) -> None:
        pod = self.pods.get(uid)
        served = self.served.get(uid)
        ip = pods.serving_address(pod, self.kwok_nodes) if pod is not None else None
        if ip is None or (served is not None and served.ip != ip):
            if served is not None:
                await self._stop(uid, "the pod is gone, deleted or moved")
            if ip is None:
                return
            served = None
        assert pod is not None
        mark = (pod["metadata"].get("annotations") or {}).get(pods.RESTART_ANNOTATION)
        if served is None:
            self.served[uid] = await self._start(pod, ip, mark)
        elif mark != served.restart_mark:
            await self._stop(uid, f"{pods.RESTART_ANNOTATION} is now {mark!r}: restarting")
            self.served[uid] = await self._start(pod, ip, mark)
            await self._report_restart(pod)

    async def _start(self, pod: dict[str, Any], ip: str, mark: str | None) -> Served:
        meta = pod["metadata"]
        where = f"{meta['namespace']}/{meta['name']}"
        container = pods.runtime_container(pod, self.config.runtime_command)
        assert container is not None
        token = await self._token(meta["namespace"], container, where)
        port = pods.port_of(container, self.config.default_port)
        if not self.routes.ensure(ip):
            raise NotYet(
                f"pod {where}: cannot listen on {ip}: add `ip route add local {ip}/16 dev lo` "
                "as root, or run the simulated runtime with --add-routes"
            )
        sim = SimRuntime(pods.identity(pod, container), self.config)
        runner = web.AppRunner(
            create_app(sim, token),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_SECONDS,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, ip, port, reuse_address=True).start()
        except OSError as e:
            await runner.cleanup()
            if e.errno == errno.EADDRINUSE:
                raise NotYet(f"pod {where}: {ip}:{port} is taken by another process") from e
            raise
        self._warned.discard(meta["uid"])
        log.info("serving pod %s on %s:%d", where, ip, port)
        return Served(ip, port, runner, sim, mark)

    async def _stop(self, uid: str, why: str) -> None:
        served = self.served.pop(uid)
        await served.stop()
        pod = served.sim.pod
        log.info("stopped pod %s/%s on %s: %s", pod.namespace, pod.name, served.ip, why)

    async def _token(self, namespace: str, container: dict[str, Any], where: str) -> str | None:
        ref = pods.token_ref(container)
        if ref is None:
            return None
        if ref.value is not None:
            return ref.value
        assert ref.secret is not None and ref.key is not None
        secret = await self._secret(namespace, ref.secret)
        value = pods.secret_value(secret, ref.key) if secret is not None else None
        if value is None:
            # A kubelet would not start the container either (CreateContainerConfigError).
            raise NotYet(f"pod {where}: Secret {ref.secret} has no key {ref.key!r} yet")
        return value

    async def _secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        cached = self.secrets.get((namespace, name))
        if cached is not None and time.monotonic() - cached[0] < SECRET_TTL_SECONDS:
            return cached[1]
        try:
            secret = await self.kube.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        self.secrets[(namespace, name)] = (time.monotonic(), secret)
        return secret

    async def _report_restart(self, pod: dict[str, Any]) -> None:
        """Tell the API what a kubelet would: the container restarted (restartCount, ID)."""
        meta = pod["metadata"]
        container = pods.runtime_container(pod, self.config.runtime_command)
        assert container is not None
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        statuses = pods.restarted_status(pod, container["name"], now)
        await self.kube.patch(
            f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
            {"status": {"containerStatuses": statuses}},
            "application/merge-patch+json",
        )
