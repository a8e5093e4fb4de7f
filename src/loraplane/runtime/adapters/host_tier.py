"""The host tier: copies of adapters that are not in a LoRA slot, LRU, and read-backs from disk.

Tiers: `gpu` (in a LoRA slot: the scheduler's LoraSlotManager decides which), `cpu` (a host copy
here, ready to be copied into a slot), `disk` (only the files; read back on demand). Host copies
are dropped least recently used first; pinned adapters and adapters with requests are kept.

Threads: HTTP threads admit new entries and the reader thread adds read-back copies; only the
engine thread takes entries into slots, puts evicted ones back and trims (after it has placed
this step's adapters, so a burst of loads fills free slots before anything is pushed to disk).
Everything here runs under the registry's lock, so an entry's registration and its tier change
together.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from loraplane.runtime.adapters.entry import AdapterEntry
from loraplane.runtime.adapters.sources import sha256_file
from loraplane.runtime.lora import AdapterFormatError, read_peft_adapter

log = logging.getLogger(__name__)


class HostTier:
    def __init__(
        self,
        lock: threading.RLock,
        max_cpu_adapters: int,
        on_change: Callable[[], None],
        pin_memory: bool = False,
    ) -> None:
        self.lock = lock
        self.pin_memory = pin_memory  # host copies page-locked, for async copies to a GPU
        self.max_cpu_adapters = max_cpu_adapters
        self.on_change = on_change  # wakes the engine: a copy is ready to be placed
        self.copies: OrderedDict[int, AdapterEntry] = OrderedDict()  # uid -> entry, LRU first
        self._reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-read")

    def admit(self, entry: AdapterEntry) -> None:
        """A freshly read entry (HTTP thread): a host copy until the engine places it."""
        with self.lock:
            self.copies[entry.uid] = entry

    def take(self, entry: AdapterEntry) -> None:
        """entry went into a LoRA slot (engine thread); it keeps its weights for when it leaves."""
        with self.lock:
            self.copies.pop(entry.uid, None)

    def put_back(self, entry: AdapterEntry) -> None:
        """entry was evicted from its LoRA slot (engine thread)."""
        with self.lock:
            if entry.retired and entry.refs == 0:
                entry.weights = None  # nobody will ask for it again
            else:
                self.copies[entry.uid] = entry

    def drop(self, entry: AdapterEntry) -> None:
        """Forget entry's host copy and its weights (a retired entry nobody holds)."""
        with self.lock:
            self.copies.pop(entry.uid, None)
            entry.weights = None

    def trim(self) -> None:
        """Push the least recently used copies over --max-cpu-adapters to disk (engine thread)."""
        with self.lock:
            over = len(self.copies) - self.max_cpu_adapters
            for uid, entry in list(self.copies.items()):
                if over <= 0:
                    break
                if entry.pinned or entry.refs > 0:
                    continue
                del self.copies[uid]
                entry.weights = None
                over -= 1

    def read_back(self, entry: AdapterEntry) -> None:
        """Read an adapter that sits on disk back into a host copy, off the caller's thread."""
        with self.lock:
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
            if self.pin_memory:
                weights.pin()
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
                self.copies[entry.uid] = entry
        self.on_change()

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)
