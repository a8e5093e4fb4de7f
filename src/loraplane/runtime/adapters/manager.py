"""The adapter registry: name -> entry, and the tiers an entry's weights live in.

Tiers: `gpu` (in a slot of the runner's stacked buffers), `cpu` (host copy, ready to be copied
into a slot), `disk` (only the files; read back on demand). Slots and host copies are handed out
LRU; pinned adapters are never evicted, and an adapter whose requests are running is never
evicted from its slot. The manager decides slot ids; copying weights into a slot is the model
runner's job, on the engine thread.

Each load makes a new entry; replacing or deleting a name retires the old entry, which keeps
serving the requests that already hold it and is freed when the last one finishes.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from loraplane.runtime.adapters.errors import AdapterNotFound, Conflict, Incompatible
from loraplane.runtime.adapters.names import check_name
from loraplane.runtime.adapters.slot_table import SlotTable
from loraplane.runtime.adapters.sources import Fetcher
from loraplane.runtime.adapters.validation import check_compatible
from loraplane.runtime.lora import AdapterFormatError, AdapterWeights, read_peft_adapter

log = logging.getLogger(__name__)
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
    slot: int | None = None
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
        if self.slot is not None:
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


@dataclass
class ModelFacts:
    """What validation needs to know about the served base model."""

    names: set[str]  # every name the base goes by: served name, source, directory
    modules: set[str]  # module paths of every nn.Linear in the base
    lora_modules: set[str]  # the ones wrapped by inject_lora


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class AdapterManager:
    def __init__(
        self,
        fetcher: Fetcher,
        facts: ModelFacts,
        max_adapters: int,
        max_cpu_adapters: int,
        max_rank: int,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.fetcher = fetcher
        self.facts = facts
        self.max_cpu_adapters = max_cpu_adapters
        self.max_rank = max_rank
        self.on_change = on_change
        self.lock = threading.RLock()
        self.entries: dict[str, AdapterEntry] = {}
        self.retired: list[AdapterEntry] = []
        self.host: OrderedDict[int, AdapterEntry] = OrderedDict()  # uid -> entry, LRU first
        self.slots = SlotTable(max_adapters)
        self.pending: list[tuple[int, AdapterEntry]] = []
        self.loading: dict[str, Loading] = {}
        self._reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-read")

    # -- registry (HTTP threads) --------------------------------------------------------------

    def register(
        self,
        name: str,
        source: str,
        revision: str | None = None,
        sha256: str | None = None,
        pinned: bool = False,
        credentials: dict[str, str] | None = None,
    ) -> tuple[AdapterEntry, bool]:
        """Fetch, verify and validate an adapter; (entry, created). Blocking: run off the loop.

        A second load of the same name and source while the first is still fetching waits
        for it instead of fetching again (an operator retrying a slow PUT).
        """
        check_name(name)
        key = (source, revision, sha256)
        with self.lock:
            current = self.entries.get(name)
            if current is not None and current.same_source(source, revision, sha256):
                self._set_pinned(current, pinned)
                return current, False
            inflight = self.loading.get(name)
            joining = inflight is not None and inflight.key == key
            if not joining:
                inflight = Loading(key=key, source=source, revision=revision)
                self.loading[name] = inflight
        assert inflight is not None
        if joining:
            inflight.done.wait()
            if inflight.error is not None:
                raise inflight.error
            assert inflight.entry is not None
            return inflight.entry, False
        try:
            inflight.entry = self._load(name, source, revision, sha256, pinned, credentials)
        except Exception as e:
            inflight.error = e
            raise
        finally:
            with self.lock:
                if self.loading.get(name) is inflight:
                    del self.loading[name]
            inflight.done.set()
        self.on_change()
        return inflight.entry, True

    def _load(
        self,
        name: str,
        source: str,
        revision: str | None,
        sha256: str | None,
        pinned: bool,
        credentials: dict[str, str] | None,
    ) -> AdapterEntry:
        local = self.fetcher.fetch(source, revision, credentials)
        entry = self._read(name, source, revision, sha256, local)
        entry.pinned = pinned
        with self.lock:
            if pinned:
                self._check_pin_room(exclude=name)
            old = self.entries.get(name)
            self.entries[name] = entry
            self.host[entry.uid] = entry
            if old is not None:
                self._retire(old)
            self._claim_free_slot(entry)
            self._trim_host()
        return entry

    def loading_now(self) -> dict[str, Loading]:
        with self.lock:
            return dict(self.loading)

    def _read(
        self, name: str, source: str, revision: str | None, sha256: str | None, local: Path
    ) -> AdapterEntry:
        weights_file = local / "adapter_model.safetensors"
        actual = sha256_file(weights_file) if weights_file.is_file() else ""
        if sha256 and actual and sha256.lower() != actual:
            from loraplane.runtime.adapters.errors import ChecksumMismatch

            raise ChecksumMismatch(
                f"adapter {name!r}: adapter_model.safetensors has sha256 {actual}, "
                f"not the {sha256} the request asked for"
            )
        try:
            weights = read_peft_adapter(local)
        except AdapterFormatError as e:
            raise Incompatible(f"adapter {name!r} from {source}: {e}") from e
        check_compatible(
            name,
            weights,
            base_names=self.facts.names,
            base_modules=self.facts.modules,
            lora_modules=self.facts.lora_modules,
            max_rank=self.max_rank,
        )
        return AdapterEntry(
            name=name,
            source=source,
            revision=revision,
            expected_sha256=sha256,
            sha256=actual,
            local_dir=local,
            rank=weights.rank,
            target_modules=sorted(weights.target_modules),
            size_bytes=weights.size_bytes,
            weights=weights,
        )

    def _claim_free_slot(self, entry: AdapterEntry) -> None:
        # A new adapter takes a free slot at once (never evicting), so a burst of loads fills
        # the slots before the host tier's limit pushes anything to disk.
        if self.slots.free_count() == 0:
            return
        slot, _ = self.slots.allocate(entry, lambda _: False)
        self.host.pop(entry.uid, None)
        entry.slot = slot
        self.pending.append((slot, entry))

    def take_pending(self) -> list[tuple[int, AdapterEntry]]:
        """Slots assigned off the engine thread whose weights the runner must copy in now."""
        with self.lock:
            pending, self.pending = self.pending, []
        return [(slot, e) for slot, e in pending if e.slot == slot and e.weights is not None]

    def _set_pinned(self, entry: AdapterEntry, pinned: bool) -> None:
        if pinned and not entry.pinned:
            self._check_pin_room(exclude=entry.name)
        entry.pinned = pinned
        if pinned:
            self.on_change()

    def _check_pin_room(self, exclude: str) -> None:
        pinned = sum(1 for e in self.entries.values() if e.pinned and e.name != exclude)
        if pinned + 1 >= self.slots.num_slots:
            raise Conflict(
                f"pinning would leave no GPU slot for unpinned adapters: {pinned} of "
                f"{self.slots.num_slots} slots are pinned; raise maxAdapters or unpin one"
            )

    def unregister(self, name: str) -> AdapterEntry:
        with self.lock:
            entry = self.entries.pop(name, None)
            if entry is None:
                raise AdapterNotFound(f"adapter {name!r} is not loaded")
            self._retire(entry)
        self.on_change()
        return entry

    def _retire(self, entry: AdapterEntry) -> None:
        entry.retired = True
        self.retired.append(entry)

    def get(self, name: str) -> AdapterEntry:
        with self.lock:
            entry = self.entries.get(name)
        if entry is None:
            raise AdapterNotFound(f"adapter {name!r} is not loaded")
        return entry

    def acquire(self, name: str) -> AdapterEntry:
        with self.lock:
            entry = self.get(name)
            entry.refs += 1
            return entry

    def release(self, entry: AdapterEntry) -> None:
        with self.lock:
            entry.refs -= 1
            assert entry.refs >= 0, entry.name

    def registered(self) -> list[AdapterEntry]:
        with self.lock:
            return sorted(self.entries.values(), key=lambda e: e.name)

    def tiers(self) -> dict[str, int]:
        counts = {"gpu": 0, "cpu": 0, "disk": 0}
        for entry in self.registered():
            counts[entry.tier] += 1
        return counts

    # -- placement (engine thread) ------------------------------------------------------------

    def place(self, entry: AdapterEntry, busy: set[int]) -> int | None:
        """The slot entry will be in for this step, or None if it cannot be yet.

        When a slot is newly assigned the caller must copy entry.weights into it before the
        forward pass. busy holds the uids of adapters whose sequences are in this step.
        """
        with self.lock:
            if entry.slot is not None:
                self.slots.touch(entry.slot)
                return entry.slot
            if entry.weights is None:
                self._reload(entry)
                return None

            def evictable(e: AdapterEntry) -> bool:
                return not e.pinned and e.uid not in busy

            if not self.slots.can_allocate(evictable):
                return None
            slot, evicted = self.slots.allocate(entry, evictable)
            self.host.pop(entry.uid, None)
            entry.slot = slot
            if evicted is not None:
                evicted.slot = None
                if evicted.retired and evicted.refs == 0:
                    evicted.weights = None
                else:
                    self.host[evicted.uid] = evicted
                self._trim_host()
            return slot

    def unplaced(self) -> list[AdapterEntry]:
        """Registered adapters with a host copy and no slot, pinned ones first."""
        with self.lock:
            for entry in self.entries.values():
                if entry.pinned and entry.slot is None and entry.weights is None:
                    self._reload(entry)  # a pinned adapter pushed to disk before its pin
            waiting = [e for e in self.entries.values() if e.slot is None and e.weights]
        return sorted(waiting, key=lambda e: (not e.pinned, e.loaded_at))

    def fail(self, entry: AdapterEntry, error: str) -> None:
        """Stop serving an adapter that could not be put in its slot; the operator sees why."""
        with self.lock:
            entry.error = error
            if entry.slot is not None:
                self.slots.deallocate(entry.slot)
                entry.slot = None

    def reap(self) -> list[int]:
        """Free retired entries no request holds any more; returns the slots to clear."""
        cleared = []
        with self.lock:
            for entry in [e for e in self.retired if e.refs == 0]:
                self.retired.remove(entry)
                if entry.slot is not None:
                    self.slots.deallocate(entry.slot)
                    cleared.append(entry.slot)
                    entry.slot = None
                self.host.pop(entry.uid, None)
                entry.weights = None
        return cleared

    def _trim_host(self) -> None:
        over = len(self.host) - self.max_cpu_adapters
        for uid, entry in list(self.host.items()):
            if over <= 0:
                break
            if entry.pinned or entry.refs > 0:
                continue
            del self.host[uid]
            entry.weights = None
            over -= 1

    def _reload(self, entry: AdapterEntry) -> None:
        if entry.reloading or entry.error:
            return
        entry.reloading = True
        self._reader.submit(self._read_back, entry)

    def _read_back(self, entry: AdapterEntry) -> None:
        try:
            weights = read_peft_adapter(entry.local_dir)
        except (AdapterFormatError, OSError) as e:
            log.error(
                "adapter %s could not be read back from %s: %s", entry.name, entry.local_dir, e
            )
            with self.lock:
                entry.error = f"read back from {entry.local_dir} failed: {e}"
                entry.reloading = False
        else:
            with self.lock:
                entry.weights = weights
                entry.reloading = False
                self.host[entry.uid] = entry
                self._trim_host()
        self.on_change()

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)


__all__ = ["AdapterEntry", "AdapterManager", "ModelFacts", "check_name"]
