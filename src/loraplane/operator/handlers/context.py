"""What every handler shares: the config, the API and runtime clients, and one Fleet per base."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import OperatorConfig
from ..fleet import Fleet
from ..kube import Kube
from ..metrics import OperatorMetrics
from ..runtimeclient import RuntimeClient
from ..scaler import Scaler


@dataclass
class Context:
    config: OperatorConfig
    kube: Kube
    runtime: RuntimeClient
    metrics: OperatorMetrics
    pod_calls: asyncio.Semaphore
    fleets: dict[tuple[str, str], Fleet] = field(default_factory=dict)
    scalers: dict[tuple[str, str], Scaler] = field(default_factory=dict)
    # (namespace, kind, name) -> (generation, being deleted) last seen: tells a spec edit or a
    # deletion from a status update
    generations: dict[tuple[str, str, str], Any] = field(default_factory=dict)

    def fleet(self, namespace: str, name: str) -> Fleet:
        key = (namespace, name)
        if key not in self.fleets:
            self.fleets[key] = Fleet(
                namespace, name, self.kube, self.runtime, self.config, self.metrics, self.pod_calls
            )
        return self.fleets[key]

    def spec_changed(self, type: str | None, body: Mapping[str, Any], first_counts: bool) -> bool:
        """Whether a watch event is more than a status update: a deletion (begun or done), or a
        new metadata.generation. An object first seen counts when first_counts is true."""
        meta = body.get("metadata") or {}
        key = (meta.get("namespace") or "", body.get("kind") or "", meta.get("name") or "")
        if type == "DELETED":
            self.generations.pop(key, None)
            return True
        generation = (meta.get("generation"), meta.get("deletionTimestamp") is not None)
        first = key not in self.generations
        changed = first_counts if first else self.generations[key] != generation
        self.generations[key] = generation
        return changed

    def scaler(self, namespace: str, name: str) -> Scaler:
        key = (namespace, name)
        fleet = self.fleet(namespace, name)
        if key not in self.scalers or self.scalers[key].fleet is not fleet:
            self.scalers[key] = Scaler(fleet)
        return self.scalers[key]

    def poke(self, namespace: str | None, base: str | None, children: bool = False) -> None:
        fleet = self.fleets.get((namespace or "", base or ""))
        if fleet is not None:
            fleet.poke(children)
