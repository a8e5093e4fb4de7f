"""Which pod gets a request: one that holds its adapter, with the fewest outstanding requests.

Pure: the caller passes the table, its own count of requests outstanding per pod, the pods
already tried for this request and a turn number that breaks ties in rotation.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import Api
from .table import Backend, Table


@dataclass(frozen=True)
class Target:
    """What a request asks for."""

    label: str
    """The served name, or the base's name: the metrics' `adapter` label."""
    adapter: str | None
    """The adapter's served name; None for the base model, which every pod serves."""


def resolve(table: Table, model: str | None) -> Target | None:
    """The target `model` names; None when it is neither the base nor one of its adapters."""
    if table.is_base(model):
        return Target(table.base.name, None)
    assert model is not None
    if table.serves(model):
        return Target(model, model)
    return None


@dataclass(frozen=True)
class Choice:
    pod: Backend
    hit: bool
    """The pod holds the adapter by the operator's verified residency (always, for the base)."""


def choose(
    table: Table,
    target: Target,
    outstanding: Mapping[str, int],
    exclude: Collection[str] = (),
    turn: int = 0,
) -> Choice | None:
    """The ready pod for this request; None when no ready pod is left to try.

    Among the ready pods that hold the adapter, the one with the fewest requests outstanding;
    when none holds it, any ready pod the same way (it may have loaded the adapter since the
    operator last wrote its status; if not, its 404 is the answer). Ties go round in `turn`.
    """
    ready = [b for name, b in table.backends.items() if name not in exclude]
    if not ready:
        return None
    pool, hit = ready, True
    if target.adapter is not None:
        holders = table.holders(target.adapter)
        holding = [b for b in ready if b.name in holders]
        pool, hit = (holding, True) if holding else (ready, False)
    fewest = min(outstanding.get(b.name, 0) for b in pool)
    ties = sorted((b for b in pool if outstanding.get(b.name, 0) == fewest), key=lambda b: b.name)
    return Choice(ties[turn % len(ties)], hit)


def requested_model(api: Api, body: Any) -> str | None:
    """The model a parsed body names: `model` (OpenAI) or `parameters.adapter_id` (TGI);
    None for the base. ValueError, in words for the client, when the body cannot say."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    if api is Api.TGI:
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError("parameters: must be an object")
        model, field = parameters.get("adapter_id"), "parameters.adapter_id"
    else:
        model, field = body.get("model"), "model"
    if model is not None and not isinstance(model, str):
        raise ValueError(f"{field}: must be a string, got {type(model).__name__}")
    return model
