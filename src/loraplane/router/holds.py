"""Requests held while no ready pod can take them: bounded, released in arrival order, timed out.

A base at zero replicas, or whose pods are all starting, cannot answer yet; its requests wait
here (their count is the demand the autoscaler wakes the base for) and go as soon as a pod is
ready. The queue decides nothing about pods: the router tells it which holds may go.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from .choice import Target


class Outcome(StrEnum):
    RELEASED = "released"
    """A pod can take it now."""
    TIMEOUT = "timeout"
    """No pod became ready in time."""
    GONE = "gone"
    """The client went away while it waited."""
    FULL = "full"
    """Not held: the queue was full."""


@dataclass(eq=False)
class Hold:
    target: Target
    tried: Mapping[str, int]
    """Pods that failed it, with when each was admitted to service then (Table.admitted):
    the router decides from these which pods may still take it."""
    released: asyncio.Future[None] = field(repr=False)


class HoldQueue:
    def __init__(self, capacity: int, on_change: Callable[[str, int], None] | None = None) -> None:
        """on_change(label, count): the number of holds of one target label changed."""
        if capacity < 1:
            raise ValueError(f"a hold queue needs room for at least 1 request, got {capacity}")
        self.capacity = capacity
        self._holds: dict[Hold, None] = {}  # insertion-ordered: arrival order
        self._by_label: Counter[str] = Counter()
        self._on_change = on_change

    def __len__(self) -> int:
        return len(self._holds)

    def held(self) -> dict[str, int]:
        """Holds per target label now."""
        return {label: n for label, n in self._by_label.items() if n}

    def admit(self, target: Target, tried: Mapping[str, int] | None = None) -> Hold | None:
        """A new hold, or None when the queue is full."""
        if len(self._holds) >= self.capacity:
            return None
        hold = Hold(target, dict(tried or {}), asyncio.get_running_loop().create_future())
        self._holds[hold] = None
        self._count(target.label, +1)
        return hold

    def release(self, can_go: Callable[[Hold], bool]) -> int:
        """Let every hold go that can_go says a pod can take now, oldest first; how many went."""
        going = [h for h in self._holds if can_go(h)]
        for hold in going:
            self._leave(hold)
            if not hold.released.done():
                hold.released.set_result(None)
        return len(going)

    async def wait(self, hold: Hold, timeout: float, gone: asyncio.Future | None = None) -> Outcome:
        """Wait until the hold is released, `timeout` seconds pass or `gone` completes."""
        waiting: set[asyncio.Future] = {hold.released}
        if gone is not None:
            waiting.add(gone)
        try:
            done, _ = await asyncio.wait(
                waiting, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            self._leave(hold)  # a no-op once released; otherwise it stops counting now
        if hold.released.done():  # released, even if just after the timeout fired
            return Outcome.RELEASED
        return Outcome.GONE if done else Outcome.TIMEOUT

    def _leave(self, hold: Hold) -> None:
        if hold in self._holds:
            del self._holds[hold]
            self._count(hold.target.label, -1)

    def _count(self, label: str, delta: int) -> None:
        self._by_label[label] += delta
        if self._on_change is not None:
            self._on_change(label, self._by_label[label])
