"""What every handler shares: the config, the API and runtime clients, and one Fleet per base."""

from __future__ import annotations

import asyncio
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
    # (namespace, kind, name) -> the last generation seen of each child, to tell spec edits
    # from status updates
    generations: dict[tuple[str, str, str], Any] = field(default_factory=dict)

    def fleet(self, namespace: str, name: str) -> Fleet:
        key = (namespace, name)
        if key not in self.fleets:
            self.fleets[key] = Fleet(
                namespace, name, self.kube, self.runtime, self.config, self.metrics, self.pod_calls
            )
        return self.fleets[key]

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
