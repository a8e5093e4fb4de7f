"""One base model's fleet: measure its pods, sync their adapters, open their gates, report.

A Fleet is the single owner of everything the operator does to one BaseModelDeployment's
pods. Its `sync` is level-based: it reads the world it is handed (the resource, its adapters,
its pods, its Deployment), measures each pod whose picture is stale, acts on the difference,
and writes status. Running it twice in a row does nothing the second time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from loraplane.api import (
    BASE_MODEL_DEPLOYMENT,
    BaseModelDeployment,
    ConditionStatus,
)
from loraplane.api.wire import ADMIN_TOKEN_KEY, credential_keys_for

from . import adaptersync, manifests, names
from .adaptersync import DesiredAdapter, Failure, GateView, PodMemory
from .bodies import desired_adapters, strip
from .config import OperatorConfig
from .kube import Kube
from .metrics import OperatorMetrics
from .pods import RuntimePod, gate_condition
from .runtimeclient import PodAddress, RuntimeCallError, RuntimeClient
from .status import (
    FleetFacts,
    base_status,
)
from .statuswriter import StatusWriter

log = logging.getLogger(__name__)
SECRET_MISSING = "secret_not_found"
# How long one pass waits for its pods' syncs before reporting; slower ones report when done.
POD_SYNC_WAIT_SECONDS = 2.0


@dataclass
class ScalingReport:
    """What the autoscaler last measured and decided, for the base's status."""

    rate: str | None  # status.requestRate
    condition: tuple[ConditionStatus, str, str]  # ScalingActive: status, reason, message
    last_scale_time: datetime | None = None


@dataclass
class World:
    """The inputs of one sync, read from kopf's indexes."""

    base: Mapping[str, Any]
    adapters: Sequence[Mapping[str, Any]]
    pods: Sequence[Mapping[str, Any]]
    deployment: Mapping[str, Any] | None


class Fleet:
    def __init__(
        self,
        namespace: str,
        name: str,
        kube: Kube,
        runtime: RuntimeClient,
        config: OperatorConfig,
        metrics: OperatorMetrics,
        pod_calls: asyncio.Semaphore,
    ) -> None:
        self.namespace, self.name = namespace, name
        self.kube, self.runtime, self.config, self.metrics = kube, runtime, config, metrics
        self.pod_calls = pod_calls
        self.trigger = asyncio.Event()
        self.children_dirty = True  # apply children on the first pass
        self.applied: tuple[int, int] | None = None  # (generation, replicas) last applied
        self.memory: dict[str, PodMemory] = {}  # pod name ->
        # pod name -> the runtime incarnation whose gate this process saw open
        self.gate_seen: dict[str, tuple[Any, ...]] = {}
        self.busy: dict[str, asyncio.Task[None]] = {}  # pod name -> its sync in flight
        self.writer = StatusWriter(kube, namespace)
        self.token: str | None = None
        self.desired_replicas: int | None = None  # set by the autoscaler when it is on
        self.scaling: ScalingReport | None = None  # set by the autoscaler on every tick
        self.port = 8000  # the runtime's, from the spec at each sync
        self._lock = asyncio.Lock()  # one sync at a time; unload_everywhere waits for it

    def poke(self, children: bool = False) -> None:
        """Something changed: sync soon. children: a child object may need putting back."""
        self.children_dirty = self.children_dirty or children
        self.trigger.set()

    # ---- the sync ---------------------------------------------------------------------------

    async def sync(self, world: World) -> None:
        async with self._lock:
            started = time.monotonic()
            try:
                await self._sync(world)
                self.metrics.syncs.labels(result="ok").inc()
            except Exception:
                self.metrics.syncs.labels(result="error").inc()
                raise
            finally:
                self.metrics.sync_seconds.observe(time.monotonic() - started)

    async def _sync(self, world: World) -> None:
        bmd = BaseModelDeployment.model_validate(strip(world.base))
        generation = bmd.metadata.generation or 0
        replicas = self.replicas_for(bmd)
        self.port = bmd.spec.runtime.port
        await self._ensure_token(bmd)
        if self.children_dirty or self.applied != (generation, replicas):
            # Cleared before applying: a child edited while we apply marks it dirty again.
            self.children_dirty = False
            try:
                for child in manifests.children(bmd, self.config, replicas):
                    await self.kube.apply(child)
            except Exception:
                self.children_dirty = True
                raise
            self.applied = (generation, replicas)

        pods = [RuntimePod.of(p) for p in world.pods]
        live = {p.name for p in pods}
        for gone in set(self.memory) - live:
            del self.memory[gone]
        for gone in set(self.gate_seen) - live:
            del self.gate_seen[gone]
        for gone in set(self.busy) - live:
            self.busy.pop(gone).cancel()
        targets = [p for p in pods if p.serving_capable]
        desired, blocked = desired_adapters(world.adapters, self.name)

        await self._start_pod_syncs(targets, desired)
        await self._gates(pods, targets, desired)
        ready, failing = await self.writer.report_adapters(
            world.adapters, targets, desired, blocked, self._mem
        )
        self.metrics.pods_out_of_sync.labels(namespace=self.namespace, base=self.name).set(
            sum(
                1
                for p in targets
                if any(not d.held_by(self._mem(p).actual.get(s)) for s, d in desired.items())
            )
        )
        await self._report_base(bmd, world, replicas, ready, failing)

    def replicas_for(self, bmd: BaseModelDeployment) -> int:
        """The replica count to apply: spec.replicas, or the autoscaler's decision."""
        scaling = bmd.spec.autoscaling
        if scaling is None or not scaling.enabled:
            return bmd.spec.replicas
        if self.desired_replicas is not None:
            return self.desired_replicas
        previous = bmd.status.desired_replicas if bmd.status else None
        start = previous if previous is not None else max(scaling.min_replicas, 1)
        return max(scaling.min_replicas, min(scaling.max_replicas, start))

    async def _ensure_token(self, bmd: BaseModelDeployment) -> None:
        if self.token is not None:
            return
        secret_name = names.admin_secret(self.name)
        data = await self.kube.read_secret(self.namespace, secret_name)
        if data is None or not data.get(ADMIN_TOKEN_KEY):
            await self.kube.create(manifests.admin_secret(bmd, manifests.new_admin_token()))
            data = await self.kube.read_secret(self.namespace, secret_name)
        self.token = (data or {}).get(ADMIN_TOKEN_KEY)

    async def _start_pod_syncs(
        self, targets: Sequence[RuntimePod], desired: Mapping[str, DesiredAdapter]
    ) -> None:
        """Each pod syncs in its own task, so a slow pod (a long download) never holds up the
        others or this pass; a task that ends wakes the fleet to report what it did."""
        for pod in targets:
            task = self.busy.get(pod.name)
            if task is None or task.done():
                task = asyncio.create_task(self._sync_pod(pod, desired), name=f"sync {pod.name}")
                task.add_done_callback(self._pod_sync_done)
                self.busy[pod.name] = task
        running = [t for t in self.busy.values() if not t.done()]
        if running:  # quick pods finish within this pass, so it reports what they did
            await asyncio.wait(running, timeout=POD_SYNC_WAIT_SECONDS)

    def _pod_sync_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "%s/%s: %s failed: %r", self.namespace, self.name, task.get_name(), task.exception()
            )
        self.trigger.set()

    def close(self) -> None:
        """Stop every pod's sync: the base is gone or the operator stops."""
        for task in self.busy.values():
            task.cancel()
        self.busy.clear()

    def _mem(self, pod: RuntimePod) -> PodMemory:
        mem = self.memory.get(pod.name)
        if mem is None or mem.incarnation != pod.incarnation:
            mem = self.memory[pod.name] = PodMemory(incarnation=pod.incarnation)
        return mem

    async def _sync_pod(self, pod: RuntimePod, desired: Mapping[str, DesiredAdapter]) -> None:
        """Measure the pod if its picture is stale, then load and unload until it matches.
        One call at a time per pod; a broken pod only delays itself."""
        mem = self._mem(pod)
        address = PodAddress(pod.name, pod.ip or "", self.port)
        try:
            if time.monotonic() - mem.measured_at > self.config.resync_seconds:
                async with self.pod_calls:
                    fresh = await self.runtime.list_adapters(address, self.token or "")
                # Unchanged answers keep their objects, so statuses built from them are
                # known to be current (StatusWriter.report_adapters).
                old = mem.actual
                mem.actual = {n: old[n] if old.get(n) == i else i for n, i in fresh.items()}
                mem.measured_at = time.monotonic()
            plan = adaptersync.plan_pod(desired, mem.actual, mem.failures, time.time())
            for served in plan.unloads:
                async with self.pod_calls:
                    await self.runtime.unload(address, self.token or "", served)
                mem.actual.pop(served, None)
                self.metrics.unloads.inc()
            for want in plan.loads:
                await self._load(address, mem, want)
        except RuntimeCallError as e:
            # Measure again next time: what it holds is unknown after a failed call.
            mem.measured_at = 0.0
            log.warning("%s/%s: %s", self.namespace, self.name, e)

    async def _load(self, address: PodAddress, mem: PodMemory, want: DesiredAdapter) -> None:
        try:
            credentials = await self._credentials(want)
        except LookupError as e:
            mem.failures[want.served_name] = Failure.after(
                mem.failures.get(want.served_name), want, SECRET_MISSING, str(e), time.time()
            )
            return
        started = time.monotonic()
        try:
            async with self.pod_calls:
                info = await self.runtime.load(
                    address, self.token or "", want.served_name, want.request(credentials)
                )
        except RuntimeCallError as e:
            if e.unreachable:
                raise
            mem.failures[want.served_name] = Failure.after(
                mem.failures.get(want.served_name), want, e.code, e.message, time.time()
            )
            mem.actual.pop(want.served_name, None)
            self.metrics.load_failures.labels(reason=e.code).inc()
            return
        self.metrics.load_seconds.observe(time.monotonic() - started)
        mem.actual[want.served_name] = info
        mem.failures.pop(want.served_name, None)

    async def _credentials(self, want: DesiredAdapter) -> dict[str, str] | None:
        if want.secret_name is None:
            return None
        data = await self.kube.read_secret(self.namespace, want.secret_name)
        if data is None:
            raise LookupError(
                f"Secret {want.secret_name!r} (spec.secretRef) not found in namespace "
                f"{self.namespace!r}: create it with the source's credentials"
            )
        keys = credential_keys_for(want.source)
        return {k: v for k, v in data.items() if k in keys}

    # ---- readiness gates ------------------------------------------------------------------

    async def _gates(
        self,
        pods: Sequence[RuntimePod],
        targets: Sequence[RuntimePod],
        desired: Mapping[str, DesiredAdapter],
    ) -> None:
        now = datetime.now(UTC).replace(microsecond=0)
        # Close first, on every pod: a runtime that died must not come back Ready and empty.
        stale = {p.name for p in pods if p.gate and self._gate_stale(p)}
        for pod in pods:
            if pod.name in stale:
                message = "the runtime restarted and lost its adapters"
                await self._set_gate(pod, False, "RuntimeRestarted", message, now)
                self.gate_seen.pop(pod.name, None)
        views = {
            p.name: GateView(
                p.name,
                bool(p.gate) and p.name not in stale,
                self._mem(p).actual,
                self._mem(p).failures,
            )
            for p in targets
        }
        wanted = list(desired.values())
        required = adaptersync.established(wanted, views.values())
        for pod in targets:
            view = views[pod.name]
            if view.open:
                self.gate_seen[pod.name] = pod.incarnation
                continue
            ok, why = adaptersync.gate_may_open(view, wanted, required)
            if ok:
                held = sum(1 for d in wanted if d.held_by(view.actual.get(d.served_name)))
                message = f"holds {held} of {len(wanted)} adapters, every one the fleet serves"
                if await self._set_gate(pod, True, "AdaptersLoaded", message, now):
                    self.gate_seen[pod.name] = pod.incarnation
            elif pod.gate is None:  # say why it waits, once
                await self._set_gate(pod, False, "LoadingAdapters", why, now)

    def _gate_stale(self, pod: RuntimePod) -> bool:
        seen = self.gate_seen.get(pod.name)
        restarted = seen is not None and seen != pod.incarnation
        return restarted or adaptersync.gate_is_stale(pod.gate_since, pod.container_started)

    async def _set_gate(
        self, pod: RuntimePod, open_: bool, reason: str, message: str, now: datetime
    ) -> bool:
        condition = gate_condition(open_, reason, message, now)
        return await self.kube.set_pod_condition(
            self.namespace, pod.name, pod.resource_version, condition
        )

    # ---- status ---------------------------------------------------------------------------

    async def _report_base(
        self, bmd: BaseModelDeployment, world: World, replicas: int, ready: int, failing: list[str]
    ) -> None:
        deploy = world.deployment or {}
        dstatus = deploy.get("status") or {}
        dconds = {c.get("type"): c for c in dstatus.get("conditions") or ()}
        failure = dconds.get("ReplicaFailure", {})
        progressing = dconds.get("Progressing", {})
        facts = FleetFacts(
            generation=bmd.metadata.generation or 0,
            desired_replicas=replicas,
            replicas=int(dstatus.get("replicas") or 0),
            ready_replicas=int(dstatus.get("readyReplicas") or 0),
            updated_replicas=int(dstatus.get("updatedReplicas") or 0),
            deployment_observed=bool(deploy)
            and (dstatus.get("observedGeneration") or 0)
            >= ((deploy.get("metadata") or {}).get("generation") or 0),
            replica_failure=failure.get("message") if failure.get("status") == "True" else None,
            rollout_stuck=progressing.get("message")
            if progressing.get("reason") == "ProgressDeadlineExceeded"
            else None,
            adapters_ready=ready,
            failing_adapters=tuple(sorted(failing)),
            selector=names.selector_string(self.name),
            endpoint=manifests.endpoint(bmd),
            request_rate=self.scaling.rate if self.scaling else None,
            last_scale_time=self.scaling.last_scale_time if self.scaling else None,
            scaling=self.scaling.condition if self.scaling else None,
        )
        status = base_status(facts, bmd.status)
        new, old = status.to_dict(), (bmd.status.to_dict() if bmd.status else None)
        if new != old:
            await self.kube.patch_status(
                BASE_MODEL_DEPLOYMENT.plural, self.namespace, self.name, new
            )

    # ---- deletion -------------------------------------------------------------------------

    async def unload_everywhere(
        self, served_name: str, pods: Sequence[Mapping[str, Any]], still_wanted: bool
    ) -> list[str]:
        """DELETE one adapter from every pod that may hold it; the pods that still do.

        A pod that is gone or terminating never holds a deletion up: it takes the adapter
        with it.
        """
        if still_wanted:  # another LoraAdapter serves this name now: leave it loaded
            return []
        holding = []
        async with self._lock:
            for pod in (RuntimePod.of(p) for p in pods):
                if not pod.ip or pod.terminating:
                    continue
                try:
                    async with self.pod_calls:
                        await self.runtime.unload(
                            PodAddress(pod.name, pod.ip, self.port), self.token or "", served_name
                        )
                    self._mem(pod).actual.pop(served_name, None)
                except RuntimeCallError as e:
                    if pod.containers_ready:  # a starting pod holds nothing yet
                        holding.append(f"{pod.name} ({e.message})")
        return holding
