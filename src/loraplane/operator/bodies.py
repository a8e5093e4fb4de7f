"""Resources as kopf hands them over (plain dicts) read into the API models and sync inputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from loraplane.api import LoraAdapter, LoraAdapterStatus

from .adaptersync import DesiredAdapter
from .status import Reason


def desired_adapters(
    adapters: Sequence[Mapping[str, Any]], base: str
) -> tuple[dict[str, DesiredAdapter], dict[str, tuple[Reason, str]]]:
    """Served name -> adapter for every live adapter of a base; the blocked ones with why.

    Two adapters of one base that claim one served name: the older keeps it.
    """
    desired: dict[str, DesiredAdapter] = {}
    blocked: dict[str, tuple[Reason, str]] = {}
    ordered = sorted(
        (a for a in adapters if not a["metadata"].get("deletionTimestamp")),
        key=lambda a: (a["metadata"].get("creationTimestamp") or "", a["metadata"]["name"]),
    )
    for body in ordered:
        try:
            want = DesiredAdapter.of(LoraAdapter.model_validate(strip(body)))
        except ValidationError as e:  # the API server validated it; a newer schema may not
            blocked[body["metadata"]["name"]] = (Reason.LOAD_FAILED, f"invalid spec: {e}")
            continue
        holder = desired.get(want.served_name)
        if holder is not None:
            blocked[want.name] = (
                Reason.SERVED_NAME_CONFLICT,
                f"LoraAdapter {holder.name!r} of base {base!r} already serves "
                f"{want.served_name!r}; set a different spec.servedName",
            )
            continue
        desired[want.served_name] = want
    return desired, blocked


def served_name_of(body: Mapping[str, Any]) -> str:
    """A LoraAdapter body's served name: spec.servedName or metadata.name."""
    return (body.get("spec") or {}).get("servedName") or body["metadata"]["name"]


def strip(body: Mapping[str, Any]) -> dict[str, Any]:
    """A resource as the API models read it: only the fields they know."""
    meta = body.get("metadata") or {}
    out: dict[str, Any] = {
        "metadata": {
            k: meta.get(k)
            for k in ("name", "namespace", "uid", "generation", "resourceVersion")
            if meta.get(k) is not None
        },
        "spec": body.get("spec") or {},
    }
    if body.get("status"):
        out["status"] = body["status"]
    return out


def adapter_status_of(body: Mapping[str, Any]) -> LoraAdapterStatus | None:
    raw = body.get("status")
    if not raw:
        return None
    try:
        return LoraAdapterStatus.model_validate(raw)
    except ValidationError:
        return None  # written by an older operator: start over
