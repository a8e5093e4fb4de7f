"""An adapter as the manager holds it: plain state that the registry and the tiers change."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraplane.runtime.adapters.guard import Guard
from loraplane.runtime.lora import AdapterWeights

_uids = itertools.count(1)


@dataclass(eq=False)
class AdapterEntry:
    name: str
    source: str
    revision: str | None
    expected_sha256: str | None
    sha256: str
    local_dir: Path
    rank: int
    target_modules: list[str]
    size_bytes: int
    pinned: bool = False
    weights: AdapterWeights | None = None
    lora_slot: int | None = None  # set by the scheduler's LoraSlotManager (engine thread)
    refs: int = 0  # requests accepted for this entry and not yet finished
    retired: bool = False
    reloading: bool = False
    error: str | None = None
    loaded_at: float = field(default_factory=time.time)
    uid: int = field(default_factory=lambda: next(_uids))

    def same_source(self, source: str, revision: str | None, sha256: str | None) -> bool:
        return (
            self.source == source
            and self.revision == revision
            and (sha256 is None or sha256 == self.sha256)
        )

    @property
    def tier(self) -> str:
        if self.lora_slot is not None:
            return "gpu"
        return "cpu" if self.weights is not None else "disk"

    @property
    def state(self) -> str:
        if self.error:
            return "failed"
        return "unloading" if self.retired else "loaded"


@dataclass(eq=False)
class Loading:
    """A load in progress: what it fetches, and its outcome for loads that join it."""

    key: tuple[str, str | None, str | None]  # source, revision, sha256
    source: str
    revision: str | None
    started_at: float = field(default_factory=time.time)
    done: threading.Event = field(default_factory=threading.Event)
    entry: AdapterEntry | None = None
    error: Exception | None = None
    # Why it must not be registered: a DELETE, or a newer PUT, came while it loaded.
    cancelled: str | None = None
    guard: Guard | None = None  # the fetch's bounds; cancelling stops the fetch too

    def cancel(self, reason: str) -> None:
        self.cancelled = reason
        if self.guard is not None:
            self.guard.reason.append(reason)
            self.guard.cancel.set()


@dataclass
class ModelFacts:
    """What validation needs to know about the served base model."""

    names: set[str]  # every name the base goes by: served name, source, directory
    modules: set[str]  # module paths of every nn.Linear in the base
    lora_modules: set[str]  # the ones wrapped by inject_lora
    # (d_in, d_out) of each wrapped module: an adapter's A and B must fit them exactly.
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
