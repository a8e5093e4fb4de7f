"""Decides, at each step boundary, which sequences run and with which adapter slot.

Every running sequence decodes one token; waiting ones are admitted (prefill) in the same step
while the token budget, the KV blocks and the adapter slots allow. Admission is round-robin
across adapters, so a burst for one adapter cannot starve another; a sequence whose adapter is
not in a slot yet is skipped without holding up the rest. When adapters wait for a slot and
every slot is held by an adapter with running requests, the least recently used holder takes
no new requests until its running ones finish and its slot can change hands; otherwise
adapters whose requests keep overlapping would keep the slots forever. When the cache runs
out during decode, the newest sequence is preempted and later recomputed.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from loraplane.runtime.adapters.manager import AdapterEntry, AdapterManager
from loraplane.runtime.block_manager import BlockManager
from loraplane.runtime.sequence import Sequence, Status


@dataclass
class Step:
    seqs: list[Sequence] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # LoRA slot per sequence, -1 = base
    loads: list[tuple[int, AdapterEntry]] = field(default_factory=list)  # copy before forward
    failed: list[Sequence] = field(default_factory=list)  # adapters that could not be read

    @property
    def num_prefill_tokens(self) -> int:
        return sum(len(s) - s.num_cached for s in self.seqs if s.num_cached == 0)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        adapters: AdapterManager,
        max_batch_tokens: int,
        max_running: int,
    ) -> None:
        self.blocks = blocks
        self.adapters = adapters
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.waiting: OrderedDict[str, deque[Sequence]] = OrderedDict()  # adapter -> FIFO
        self.running: list[Sequence] = []
        self.draining: set[int] = set()  # uids of slot holders admitting nothing new

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def has_work(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = Status.WAITING
        queue = self.waiting.setdefault(seq.adapter_key, deque())
        if front:
            queue.appendleft(seq)
        else:
            queue.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        queue = self.waiting.get(seq.adapter_key)
        if queue is not None and seq in queue:
            queue.remove(seq)
        if seq.block_table:
            self.blocks.deallocate(seq)

    def schedule(self) -> Step:
        step = Step()
        busy = {s.adapter.uid for s in self.running if s.adapter is not None}
        self._decode(step, busy)
        self._admit(step, busy)
        return step

    def _slot(self, seq: Sequence, step: Step, busy: set[int]) -> int | None:
        if seq.adapter is None:
            return -1
        had = seq.adapter.slot
        slot = self.adapters.place(seq.adapter, busy)
        if slot is not None and had is None:
            step.loads.append((slot, seq.adapter))
        if slot is not None:
            busy.add(seq.adapter.uid)
        return slot

    def _decode(self, step: Step, busy: set[int]) -> None:
        kept: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            while not self.blocks.can_append(seq) and queue:
                self._preempt(queue.pop())  # the newest running sequence makes room
            if not self.blocks.can_append(seq):
                self._preempt(seq)
                continue
            slot = self._slot(seq, step, busy)
            assert slot is not None, "a running sequence's adapter is always placeable"
            self.blocks.append(seq)
            kept.append(seq)
            step.seqs.append(seq)
            step.slots.append(slot)
        self.running = kept

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.deallocate(seq)
        self.add(seq, front=True)

    def _wanted(self) -> int:
        """Adapters whose next request waits for a slot."""
        heads = [q[0].adapter for q in self.waiting.values() if q]
        return sum(1 for a in heads if a is not None and a.slot is None and not a.error)

    def _admit(self, step: Step, busy: set[int]) -> None:
        budget = self.max_batch_tokens - len(step.seqs)
        self.draining = self.adapters.to_drain(self._wanted(), busy, self.draining)
        progress = True
        while progress and len(self.running) < self.max_running:
            progress = False
            for key in list(self.waiting):
                queue = self.waiting[key]
                if not queue or len(self.running) >= self.max_running:
                    continue
                seq = queue[0]
                if seq.adapter is not None and seq.adapter.error:
                    queue.popleft()
                    step.failed.append(seq)
                    continue
                if len(seq) > budget or not self.blocks.can_allocate(seq):
                    continue
                if seq.adapter is not None and seq.adapter.uid in self.draining:
                    continue
                slot = self._slot(seq, step, busy)
                if slot is None:
                    continue
                queue.popleft()
                self.blocks.allocate(seq)
                seq.status = Status.RUNNING
                self.running.append(seq)
                step.seqs.append(seq)
                step.slots.append(slot)
                budget -= len(seq)
                # Round-robin: this adapter goes to the back of the line.
                self.waiting.move_to_end(key)
                progress = True
            for key in [k for k, q in self.waiting.items() if not q]:
                del self.waiting[key]
