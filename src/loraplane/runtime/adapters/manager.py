"""The adapter registry: name -> entry, and the loads in flight.

Each load makes a new entry; replacing or deleting a name retires the old entry, which keeps
serving the requests that already hold it and is freed when the last one finishes. HTTP
threads register entries into the host tier (host_tier.py) and nothing more: LoRA slots are
the scheduler's (lora_slot_manager.py), on the engine thread, which asks this registry which
adapters wait for one (unplaced) and which retired ones to free (reap).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from loraplane.api.wire import redact_source
from loraplane.runtime.adapters.entry import AdapterEntry, Loading, ModelFacts
from loraplane.runtime.adapters.errors import (
    AdapterNotFound,
    ChecksumMismatch,
    Conflict,
    InvalidAdapter,
    RuntimeClosing,
)
from loraplane.runtime.adapters.guard import Guard
from loraplane.runtime.adapters.host_tier import HostTier
from loraplane.runtime.adapters.names import check_name
from loraplane.runtime.adapters.sources import Fetcher, sha256_file
from loraplane.runtime.adapters.validation import check_compatible
from loraplane.runtime.lora import AdapterFormatError, read_peft_adapter


class AdapterManager:
    def __init__(
        self,
        fetcher: Fetcher,
        facts: ModelFacts,
        max_adapters: int,
        max_cpu_adapters: int,
        max_rank: int,
        on_change: Callable[[], None] = lambda: None,
        pin_memory: bool = False,
    ) -> None:
        self.fetcher = fetcher
        self.facts = facts
        self.max_rank = max_rank
        self.on_change = on_change
        self.lock = threading.RLock()
        self.entries: dict[str, AdapterEntry] = {}
        self.retired: list[AdapterEntry] = []
        self.loading: dict[str, Loading] = {}
        self.closing = False
        self.max_adapters = max_adapters  # LoRA slots: pinning must leave one unpinned
        self.host = HostTier(self.lock, max_cpu_adapters, on_change, pin_memory)

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
        # Hex digits in either case name the same digest: the same PUT must stay a no-op.
        sha256 = sha256.lower() if sha256 else None
        key = (source, revision, sha256)
        with self.lock:
            if self.closing:
                raise RuntimeClosing(
                    f"adapter {name!r} was not loaded: the runtime is shutting down"
                )
            current = self.entries.get(name)
            # A failed adapter is loaded again: a PUT is how the operator repairs it.
            if (
                current is not None
                and current.same_source(source, revision, sha256)
                and not current.error
            ):
                self._set_pinned(current, pinned)
                return current, False
            inflight = self.loading.get(name)
            joining = inflight is not None and inflight.key == key
            if not joining:
                if inflight is not None:  # the newest PUT wins, whichever load ends first
                    inflight.cancel(f"a PUT from {redact_source(source)} replaced it")
                inflight = Loading(
                    key=key,
                    source=source,
                    revision=revision,
                    guard=Guard(self.fetcher.limits, source),
                )
                self.loading[name] = inflight
        assert inflight is not None
        if joining:
            inflight.done.wait()
            if inflight.error is not None:
                raise inflight.error
            assert inflight.entry is not None
            return inflight.entry, False
        try:
            inflight.entry = self._load(name, inflight, sha256, pinned, credentials)
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
        inflight: Loading,
        sha256: str | None,
        pinned: bool,
        credentials: dict[str, str] | None,
    ) -> AdapterEntry:
        source, revision = inflight.source, inflight.revision
        local = self.fetcher.fetch(
            source, revision, credentials, sha256=sha256, guard=inflight.guard
        )
        entry = self._read(name, source, revision, sha256, local)
        entry.pinned = pinned
        with self.lock:
            if inflight.cancelled:
                raise Conflict(
                    f"adapter {name!r} from {redact_source(source)} was not registered: "
                    f"{inflight.cancelled} while it loaded"
                )
            if pinned:
                self._check_pin_room(exclude=name)
            old = self.entries.get(name)
            self.entries[name] = entry
            if old is not None:
                self._retire(old)
            self.host.admit(entry)
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
            self.fetcher.forget(local)  # a bad download must not be served from the cache
            raise ChecksumMismatch(
                f"adapter {name!r}: adapter_model.safetensors has sha256 {actual}, "
                f"not the {sha256} the request asked for"
            )
        try:
            weights = read_peft_adapter(local)
            if self.host.pin_memory:
                weights.pin()
        except AdapterFormatError as e:
            self.fetcher.forget(local)
            raise InvalidAdapter(
                f"adapter {name!r} from {redact_source(source)}: {e}", e.field
            ) from e
        check_compatible(
            name,
            weights,
            base_names=self.facts.names,
            base_modules=self.facts.modules,
            lora_modules=self.facts.lora_modules,
            max_rank=self.max_rank,
            shapes=self.facts.shapes,
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

    def _set_pinned(self, entry: AdapterEntry, pinned: bool) -> None:
        if pinned and not entry.pinned:
            self._check_pin_room(exclude=entry.name)
        entry.pinned = pinned
        if pinned:
            self.on_change()

    def _check_pin_room(self, exclude: str) -> None:
        pinned = sum(1 for e in self.entries.values() if e.pinned and e.name != exclude)
        if pinned + 1 >= self.max_adapters:
            raise Conflict(
                f"pinning would leave no GPU slot for unpinned adapters: {pinned} of "
                f"{self.max_adapters} slots are pinned; raise maxAdapters or unpin one"
            )

    def unregister(self, name: str) -> AdapterEntry | None:
        """Retire name's entry and cancel a load of it in flight (None when only that was)."""
        with self.lock:
            entry = self.entries.pop(name, None)
            inflight = self.loading.pop(name, None)
            if entry is None and inflight is None:
                raise AdapterNotFound(f"adapter {name!r} is not loaded")
            if inflight is not None:
                # Else the load would land after the DELETE was answered, and stay.
                inflight.cancel("a DELETE came")
            if entry is not None:
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

    def unloading(self) -> list[AdapterEntry]:
        """Retired entries still serving requests, under names nothing new was loaded as."""
        with self.lock:
            return [e for e in self.retired if e.refs > 0 and e.name not in self.entries]

    def registered(self) -> list[AdapterEntry]:
        with self.lock:
            return sorted(self.entries.values(), key=lambda e: e.name)

    def tiers(self) -> dict[str, int]:
        counts = {"gpu": 0, "cpu": 0, "disk": 0}
        for entry in self.registered():
            counts[entry.tier] += 1
        return counts

    # -- the scheduler's (engine thread) -----------------------------------------------------

    def unplaced(self) -> list[AdapterEntry]:
        """Registered adapters with a host copy and no LoRA slot, pinned ones first; a pinned
        adapter pushed to disk before its pin is read back."""
        with self.lock:
            for entry in self.entries.values():
                if entry.pinned and entry.lora_slot is None and entry.weights is None:
                    self.host.read_back(entry)
            waiting = [e for e in self.entries.values() if e.lora_slot is None and e.weights]
        return sorted(waiting, key=lambda e: (not e.pinned, e.loaded_at))

    def reap(self) -> list[AdapterEntry]:
        """Retired entries no request holds any more, their host copies dropped; the caller
        frees their LoRA slots."""
        with self.lock:
            done = [e for e in self.retired if e.refs == 0]
            for entry in done:
                self.retired.remove(entry)
                self.host.drop(entry)
        return done

    def fail(self, entry: AdapterEntry, error: str) -> None:
        """Stop serving an adapter whose weights could not be copied into its LoRA slot (the
        caller took the slot back); the operator sees why."""
        with self.lock:
            entry.error = error

    def stop_loading(self) -> None:
        """Shutdown: cancel the loads in flight, so their threads end and the process can
        exit, and refuse new ones."""
        with self.lock:
            self.closing = True
            for inflight in self.loading.values():
                inflight.cancel("the runtime is shutting down")

    def close(self) -> None:
        self.stop_loading()
        self.host.close()


__all__ = ["AdapterEntry", "AdapterManager", "Loading", "ModelFacts", "check_name"]
