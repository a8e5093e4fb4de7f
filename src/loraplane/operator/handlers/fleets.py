"""A daemon per BaseModelDeployment runs its Fleet; pod and Deployment changes wake it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf

from loraplane.api import BASE_MODEL_DEPLOYMENT, GROUP, LORA_ADAPTER, VERSION

from .. import names, routing
from ..fleet import World
from .context import Context

log = logging.getLogger(__name__)
OURS = {names.LABEL_BASE: kopf.PRESENT, names.LABEL_MANAGED_BY: names.MANAGED_BY}
ROUTERS = {routing.LABEL_ROUTER_FOR: kopf.PRESENT}
RUNTIME_PODS = {names.LABEL_BASE: kopf.PRESENT, names.LABEL_COMPONENT: names.COMPONENT_RUNTIME}
ERROR_DELAYS = (1, 2, 5, 10, 30)
DEBOUNCE_SECONDS = 0.2


def _base_key(namespace: str | None, labels: Any) -> tuple[str, str]:
    return (namespace or "", (labels or {}).get(names.LABEL_BASE, ""))


@kopf.index(GROUP, VERSION, BASE_MODEL_DEPLOYMENT.plural)
def bases(namespace: str, name: str, **_: Any) -> dict[tuple[str, str], bool]:
    return {(namespace, name): True}


@kopf.index(GROUP, VERSION, LORA_ADAPTER.plural)
def adapters_by_base(namespace: str, body: kopf.Body, spec: kopf.Spec, **_: Any) -> dict:
    return {(namespace, spec.get("baseModel", "")): dict(body)}


@kopf.index("", "v1", "pods", labels=RUNTIME_PODS)
def pods_by_base(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {_base_key(namespace, labels): dict(body)}


@kopf.index("", "v1", "pods", labels={routing.LABEL_ROUTER_FOR: kopf.PRESENT})
def routers_by_base(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace or "", labels.get(routing.LABEL_ROUTER_FOR, "")): dict(body)}


@kopf.index("apps", "v1", "deployments", labels=OURS)
def deployments_by_base(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {_base_key(namespace, labels): dict(body)}


@kopf.on.event("", "v1", "pods", labels=RUNTIME_PODS)
def pod_changed(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    memo.ctx.poke(*_base_key(namespace, labels))


@kopf.on.event("apps", "v1", "deployments", labels=OURS)
@kopf.on.event("", "v1", "services", labels=OURS)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=OURS)
def child_changed(
    namespace: str,
    labels: kopf.Labels,
    type: str | None,
    body: kopf.Body,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    memo.ctx.poke(*_base_key(namespace, labels), children=_needs_putting_back(memo.ctx, type, body))


@kopf.on.event("apps", "v1", "deployments", labels=ROUTERS)
@kopf.on.event("", "v1", "services", labels=ROUTERS)
def router_child_changed(
    namespace: str,
    labels: kopf.Labels,
    type: str | None,
    body: kopf.Body,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    base = labels.get(routing.LABEL_ROUTER_FOR, "")
    memo.ctx.poke(namespace, base, children=_needs_putting_back(memo.ctx, type, body))


def _needs_putting_back(ctx: Context, type: str | None, body: kopf.Body) -> bool:
    """A child deleted, or whose spec changed (by hand, or by our own apply: SSA with force
    puts our fields back and is a no-op when they are ours already). A status update alone
    (a rollout progressing) applies nothing; a child first seen is checked by the fleet's
    first pass anyway."""
    return ctx.spec_changed(type, body, first_counts=False)


def _one(index: kopf.Index, key: tuple[str, str]) -> Any:
    store = index.get(key)
    return next(iter(store), None) if store is not None else None


@kopf.daemon(GROUP, VERSION, BASE_MODEL_DEPLOYMENT.plural, cancellation_timeout=30)
async def run_fleet(
    namespace: str,
    name: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    adapters_by_base: kopf.Index,
    pods_by_base: kopf.Index,
    deployments_by_base: kopf.Index,
    **_: Any,
) -> None:
    """Sync the fleet whenever something changes, and every resync period regardless."""
    ctx: Context = memo.ctx
    fleet = ctx.fleet(namespace, name)
    key = (namespace, name)
    errors = 0
    try:
        while not stopped:
            fleet.trigger.clear()
            world = World(
                base=dict(body),
                adapters=list(adapters_by_base.get(key, [])),
                pods=list(pods_by_base.get(key, [])),
                deployment=_one(deployments_by_base, key),
            )
            delay = ctx.config.resync_seconds
            try:
                await fleet.sync(world)
                errors = 0
            except Exception as e:
                delay = ERROR_DELAYS[min(errors, len(ERROR_DELAYS) - 1)]
                errors += 1
                log.exception("sync of %s/%s failed (retry in %ss): %s", namespace, name, delay, e)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(fleet.trigger.wait(), timeout=delay)
            # Let a burst of events (pods finishing, gates opening) land before the next pass.
            await asyncio.sleep(DEBOUNCE_SECONDS)
    finally:
        fleet.close()
        ctx.fleets.pop(key, None)


@kopf.daemon(GROUP, VERSION, BASE_MODEL_DEPLOYMENT.plural, id="autoscaler", cancellation_timeout=10)
async def run_autoscaler(
    namespace: str,
    name: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    pods_by_base: kopf.Index,
    routers_by_base: kopf.Index,
    **_: Any,
) -> None:
    """Scrape the base's pods and routers and decide its replica count every few seconds."""
    ctx: Context = memo.ctx
    key = (namespace, name)
    try:
        while not stopped:
            try:
                await ctx.scaler(namespace, name).tick(
                    dict(body), list(pods_by_base.get(key, [])), list(routers_by_base.get(key, []))
                )
            except Exception as e:  # the next tick measures again
                log.exception("autoscaling %s/%s failed: %s", namespace, name, e)
            await stopped.wait(ctx.config.autoscale_seconds)
    finally:
        ctx.scalers.pop(key, None)
