"""LoraAdapter changes wake their base's fleet; deletion unloads from every pod first."""

from __future__ import annotations

from typing import Any

import kopf

from loraplane.api import GROUP, LORA_ADAPTER, VERSION

from ..bodies import served_name_of
from ..status import Reason, blocked_adapter_status
from .context import Context


@kopf.on.event(GROUP, VERSION, LORA_ADAPTER.plural)
async def adapter_changed(
    namespace: str,
    name: str,
    body: kopf.Body,
    spec: kopf.Spec,
    type: str | None,
    memo: kopf.Memo,
    bases: kopf.Index,
    **_: Any,
) -> None:
    ctx: Context = memo.ctx
    base = spec.get("baseModel", "")
    if (namespace, base) in bases:
        # Our own status patches come back as events too: only a new adapter, a spec change
        # or a deletion is news to the fleet.
        if ctx.spec_changed(type, body, first_counts=True):
            ctx.poke(namespace, base)
        return
    if type == "DELETED" or body.get("metadata", {}).get("deletionTimestamp"):
        return
    # No fleet will report on it: say what it waits for.
    meta = body.get("metadata", {})
    message = (
        f"BaseModelDeployment {base!r} does not exist in namespace {namespace!r}; "
        "the adapter loads as soon as it is created"
    )
    status = blocked_adapter_status(
        meta.get("generation") or 0,
        served_name_of(body),
        Reason.BASE_MODEL_NOT_FOUND,
        message,
        None,
    )
    current = (body.get("status") or {}).get("conditions") or []
    if any(
        c.get("reason") == Reason.BASE_MODEL_NOT_FOUND and c.get("type") == "Ready" for c in current
    ):
        return
    await ctx.kube.patch_status(LORA_ADAPTER.plural, namespace, name, status.to_dict())


@kopf.on.delete(GROUP, VERSION, LORA_ADAPTER.plural)
async def unload_adapter(
    namespace: str,
    name: str,
    body: kopf.Body,
    spec: kopf.Spec,
    memo: kopf.Memo,
    pods_by_base: kopf.Index,
    adapters_by_base: kopf.Index,
    bases: kopf.Index,
    **_: Any,
) -> None:
    ctx: Context = memo.ctx
    base = spec.get("baseModel", "")
    key = (namespace, base)
    if key not in bases:
        return  # no base, no pods: nothing holds it
    fleet = ctx.fleet(namespace, base)
    served = served_name_of(body)
    others = [
        a
        for a in adapters_by_base.get(key, [])
        if a["metadata"]["name"] != name
        and not a["metadata"].get("deletionTimestamp")
        and served_name_of(a) == served
    ]
    holding = await fleet.unload_everywhere(served, list(pods_by_base.get(key, [])), bool(others))
    if holding:
        raise kopf.TemporaryError(f"still loaded on {', '.join(holding)}", delay=5)
    fleet.writer.forget(name)
    obj = {**body, "kind": LORA_ADAPTER.kind}
    await ctx.kube.event(
        obj, "Normal", "Unloaded", f"unloaded {served!r} from every pod of {base!r}"
    )
