"""Which tier an adapter's weights live in, and moving them between tiers.

Tiers: `gpu` (in a slot of the runner's stacked buffers), `cpu` (host copy, ready to be copied
into a slot), `disk` (only the files; read back on demand). Slots and host copies are handed out
LRU; pinned adapters are never evicted, and an adapter whose requests are running is never
evicted from its slot. This decides slot ids; copying weights into a slot is the model runner's
job, on the engine thread.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from loraplane.runtime.adapters.entry import AdapterEntry
from loraplane.runtime.adapters.slot_table import SlotTable
from loraplane.runtime.adapters.sources import sha256_file
from loraplane.runtime.lora import AdapterFormatError, read_peft_adapter

log = logging.getLogger(__name__)


class Placement:
    """GPU slots, the host LRU and disk read-backs, under the registry's lock.

    The lock is the registry's own, so an entry's registration and its tier change together.
    """

    def __init__(
        self,
        lock: threading.RLock,
        max_adapters: int,
        max_cpu_adapters: int,
        on_change: Callable[[], None],
    ) -> None:
        self.lock = lock
        self.max_cpu_adapters = max_cpu_adapters
        self.on_change = on_change
        self.host: OrderedDict[int, AdapterEntry] = OrderedDict()  # uid -> entry, LRU first
        self.slots = SlotTable(max_adapters)
        self.pending: list[tuple[int, AdapterEntry]] = []
        self._reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-read")

    def admit(self, entry: AdapterEntry) -> None:
        """Take in a freshly read entry: a host copy, and a free slot if there is one.

        The caller holds the lock.
        """
        self.host[entry.uid] = entry
        self._claim_free_slot(entry)
        self._trim_host()

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
                self.reload(entry)
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

    def to_drain(self, wanted: int, busy: set[int], draining: set[int]) -> set[int]:
        """uids of slot holders that should take no new requests, so that `wanted` adapters
        waiting for a slot get one when these finish their running requests.

        Only needed for the slots that are neither free nor held by an idle adapter (those
        change hands at once). LRU first and never pinned; holders already draining stay so,
        so that one drains to the end instead of the choice moving from step to step.
        """
        with self.lock:
            holders = [e.uid for e in self.slots.owner.values() if not e.pinned]
            idle = sum(1 for u in holders if u not in busy)
            short = wanted - self.slots.free_count() - idle
            if short <= 0:
                return set()
            running = [u for u in holders if u in busy]
            ordered = [u for u in running if u in draining] + [
                u for u in running if u not in draining
            ]
            return set(ordered[:short])

    def fail(self, entry: AdapterEntry, error: str) -> None:
        """Stop serving an adapter that could not be put in its slot; the operator sees why."""
        with self.lock:
            entry.error = error
            if entry.slot is not None:
                self.slots.deallocate(entry.slot)
                entry.slot = None

    def free(self, entry: AdapterEntry) -> int | None:
        """Drop every copy of entry's weights; returns the slot it held. The caller holds the lock."""
        slot = entry.slot
        if slot is not None:
            self.slots.deallocate(slot)
            entry.slot = None
        self.host.pop(entry.uid, None)
        entry.weights = None
        return slot

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

    def reload(self, entry: AdapterEntry) -> None:
        """Read an adapter that sits on disk back into a host copy, off the caller's thread."""
        if entry.reloading or entry.error:
            return
        entry.reloading = True
        self._reader.submit(self._read_back, entry)

    def _read_back(self, entry: AdapterEntry) -> None:
        try:
            # The files may have changed under a file:// or pvc:// source since the load:
            # serving them would break what the sha256 we report promises.
            actual = sha256_file(entry.local_dir / "adapter_model.safetensors")
            if actual != entry.sha256:
                raise AdapterFormatError(
                    f"adapter_model.safetensors changed since the load (sha256 {actual}, "
                    f"loaded {entry.sha256}); PUT the adapter again"
                )
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
