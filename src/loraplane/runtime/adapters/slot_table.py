"""Hands out GPU slot ids to adapters, evicting the least recently used one that is free to go."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.owner: OrderedDict[int, Any] = OrderedDict()  # slot -> entry, least recent first

    def touch(self, slot: int) -> None:
        self.owner.move_to_end(slot)

    def _victim(self, evictable: Callable[[Any], bool]) -> int | None:
        return next((s for s, e in self.owner.items() if evictable(e)), None)

    def can_allocate(self, evictable: Callable[[Any], bool]) -> bool:
        return len(self.owner) < self.num_slots or self._victim(evictable) is not None

    def allocate(self, entry: Any, evictable: Callable[[Any], bool]) -> tuple[int, Any]:
        """A slot for entry, and the entry evicted from it (or None)."""
        free = sorted(set(range(self.num_slots)) - set(self.owner))
        evicted = None
        if free:
            slot = free[0]
        else:
            victim = self._victim(evictable)
            assert victim is not None, "allocate without can_allocate"
            slot, evicted = victim, self.owner.pop(victim)
        self.owner[slot] = entry
        return slot, evicted

    def deallocate(self, slot: int) -> None:
        self.owner.pop(slot, None)

    def free_count(self) -> int:
        return self.num_slots - len(self.owner)
