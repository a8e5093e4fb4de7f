"""Hands out LoRA slot ids to adapters: the scheduler's allocator, used only on the engine thread.

The same verbs as the KV block manager: can_allocate / allocate / deallocate. A slot changes
hands least recently used first; a pinned adapter, and one whose sequences are in this step
(`busy`), is never evicted. An allocation is only an id: the engine copies the adapter's weights
into a newly allocated slot (Step.loads) before the forward pass that reads it.
"""

from __future__ import annotations

from collections import OrderedDict

from loraplane.runtime.adapters.entry import AdapterEntry
from loraplane.runtime.adapters.host_tier import HostTier


class LoraSlotManager:
    def __init__(self, num_slots: int, host: HostTier) -> None:
        assert num_slots > 0
        self.num_slots = num_slots
        self.host = host  # where an evicted adapter's copy goes back to
        self.owner: OrderedDict[int, AdapterEntry] = OrderedDict()  # slot -> entry, LRU first

    @property
    def num_free(self) -> int:
        return self.num_slots - len(self.owner)

    def _victim(self, busy: set[int]) -> int | None:
        return next((s for s, e in self.owner.items() if not e.pinned and e.uid not in busy), None)

    def can_allocate(self, entry: AdapterEntry, busy: set[int]) -> bool:
        """entry holds a slot, or one is free, or an idle unpinned holder can give its up."""
        return entry.lora_slot is not None or self.num_free > 0 or self._victim(busy) is not None

    def allocate(self, entry: AdapterEntry, busy: set[int]) -> int:
        """entry's slot for this step; the caller copies entry.weights in when entry had none."""
        if entry.lora_slot is not None:
            self.owner.move_to_end(entry.lora_slot)
            return entry.lora_slot
        free = sorted(set(range(self.num_slots)) - set(self.owner))
        if free:
            slot = free[0]
        else:
            victim = self._victim(busy)
            assert victim is not None, "allocate without can_allocate"
            slot, evicted = victim, self.owner.pop(victim)
            evicted.lora_slot = None
            self.host.put_back(evicted)
        self.owner[slot] = entry
        entry.lora_slot = slot
        self.host.take(entry)
        return slot

    def deallocate(self, entry: AdapterEntry) -> int | None:
        """Take entry's slot back; returns it (for the runner to clear), or None."""
        slot, entry.lora_slot = entry.lora_slot, None
        if slot is not None:
            self.owner.pop(slot, None)
        return slot

    def to_hand_over(self, wanted: int, busy: set[int], handing_over: set[int]) -> set[int]:
        """uids of slot holders that take no new requests, so that `wanted` adapters waiting
        for a slot get one once these finish their running requests.

        Only needed for the slots that are neither free nor held by an idle adapter (those
        change hands at once). LRU first and never pinned; a holder already handing over stays
        so, so that one hands over to the end instead of the choice moving from step to step.
        """
        holders = [e.uid for e in self.owner.values() if not e.pinned]
        idle = sum(1 for u in holders if u not in busy)
        short = wanted - self.num_free - idle
        if short <= 0:
            return set()
        running = [u for u in holders if u in busy]
        ordered = [u for u in running if u in handing_over] + [
            u for u in running if u not in handing_over
        ]
        return set(ordered[:short])
