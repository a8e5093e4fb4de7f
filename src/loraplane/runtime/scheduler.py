"""Decides, at each step boundary, which sequences run and which adapter holds which LoRA slot.

Every running sequence decodes one token first; prompts being prefilled then get their next
chunk, and waiting ones are admitted in the same step while the token budget, the KV blocks
(less a free-block watermark) and the LoRA slots allow; an admitted prompt starts after its
longest cached prefix (block_manager.py). Admission is round-robin
across adapters, so a burst for one adapter cannot starve another; a sequence whose adapter is
not in a LoRA slot yet is skipped without holding up the rest. When adapters wait for a slot
and every slot is held by an adapter with running requests, the least recently used holder
hands its slot over: it takes no new requests until its running ones finish; otherwise
adapters whose requests keep overlapping would keep the slots forever. When the cache runs
out during decode, the newest sequence is preempted and later recomputed.

The scheduler owns both allocators (KV blocks and LoRA slots) and is used only on the engine
thread. What it decided for the device is in the Step: the slots to clear and the weights to
copy in, then the sequences to run.

With async scheduling the next step is scheduled while the current one runs: a sequence whose
token from that step is not read yet counts it (Sequence.num_pending), so it decodes that token
next like any other, one position and block further on; a sequence whose token is known to be
its last (max_tokens, the length limit) has nothing uncached and is not run again. An EOS is
only known later: its sequence's work in the next step is dropped by the engine.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Protocol

from loraplane.runtime.adapters.entry import AdapterEntry
from loraplane.runtime.block_manager import BlockManager
from loraplane.runtime.lora_slot_manager import LoraSlotManager
from loraplane.runtime.sequence import Sequence, Status


class Registry(Protocol):
    """What the scheduler needs from the adapter registry."""

    def unplaced(self) -> list[AdapterEntry]:
        """Registered adapters with a host copy and no LoRA slot, pinned ones first."""
        ...

    def reap(self) -> list[AdapterEntry]:
        """Retired adapters nobody holds any more: their slots are to be freed."""
        ...


@dataclass
class Step:
    seqs: list[Sequence] = field(default_factory=list)  # decodes first, then prefill chunks
    lora_slots: list[int] = field(default_factory=list)  # per sequence, -1 = base
    chunks: list[int] = field(default_factory=list)  # per sequence: tokens computed this step
    # For the device, in this order (a slot freed here may be handed out again in the same
    # step): clear the freed slots, then copy each newly placed adapter into its slot.
    clears: list[int] = field(default_factory=list)
    loads: list[tuple[int, AdapterEntry]] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # their adapter failed

    def add(self, seq: Sequence, lora_slot: int, chunk: int) -> None:
        assert 0 < chunk <= seq.num_uncached, (chunk, seq.num_uncached)
        self.seqs.append(seq)
        self.lora_slots.append(lora_slot)
        self.chunks.append(chunk)

    @property
    def samples(self) -> list[bool]:
        """Per sequence: does this step reach its last token (and so sample the next)?"""
        return [c == s.num_uncached for s, c in zip(self.seqs, self.chunks, strict=True)]

    @property
    def num_tokens(self) -> int:
        return sum(self.chunks)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        lora_slots: LoraSlotManager,
        registry: Registry,
        max_num_batched_tokens: int,
        max_running: int,
    ) -> None:
        """max_num_batched_tokens: tokens per forward, the step's budget. Decodes take one
        each and come first; prompts are then prefilled in chunks within what is left, so a
        long prompt neither waits for an empty step nor stalls the streams already running."""
        assert max_num_batched_tokens >= 1 and max_running >= 1
        self.blocks = blocks
        self.lora_slots = lora_slots
        self.registry = registry
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_running = max_running
        self.waiting: OrderedDict[str, deque[Sequence]] = OrderedDict()  # adapter -> FIFO
        self.running: list[Sequence] = []
        self.handing_over: set[int] = set()
        self.preemptions = 0  # uids of slot holders admitting nothing new

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
        # Retired adapters give their slots back first, so that idle placement and this
        # step's admissions can reuse them; idle placement comes before admission so that
        # a pinned or freshly loaded adapter gets a free slot before a request's adapter
        # evicts anything for it.
        for entry in self.registry.reap():
            slot = self.lora_slots.deallocate(entry)
            if slot is not None:
                step.clears.append(slot)
        self._place_idle(step, busy)
        if self.has_work():
            self._continue_running(step, busy)
            self._admit(step, busy)
        # After placement: a copy just put back or read in is kept if a slot took it.
        self.lora_slots.host.trim()
        return step

    def _place_idle(self, step: Step, busy: set[int]) -> None:
        """Registered adapters into free slots (a pinned one may evict an idle holder)."""
        for entry in self.registry.unplaced():
            if not entry.pinned and self.lora_slots.num_free == 0:
                break
            if self.lora_slots.can_allocate(entry, busy):
                step.loads.append((self.lora_slots.allocate(entry, busy), entry))

    def _lora_slot(self, seq: Sequence, step: Step, busy: set[int]) -> int | None:
        """seq's LoRA slot for this step (-1: the base), or None when it cannot have one yet."""
        entry = seq.adapter
        if entry is None:
            return -1
        if entry.lora_slot is None:
            if entry.weights is None:
                self.lora_slots.host.read_back(entry)  # on disk: placed once it is read
                return None
            if not self.lora_slots.can_allocate(entry, busy):
                return None
            step.loads.append((self.lora_slots.allocate(entry, busy), entry))
        slot = self.lora_slots.allocate(entry, busy)  # most recently used now
        busy.add(entry.uid)
        return slot

    def _continue_running(self, step: Step, busy: set[int]) -> None:
        """Every running decode gets its token; running prefills their next chunks."""
        kept: list[Sequence] = []
        budget = self.max_num_batched_tokens
        # Decodes before prefill chunks (stable otherwise): oldest first.
        queue = sorted(self.running, key=lambda s: s.num_uncached > 1)
        while queue:
            seq = queue.pop(0)
            while not self.blocks.can_append(seq) and queue:
                self._preempt(queue.pop())  # the newest running sequence makes room
            if not self.blocks.can_append(seq):
                self._preempt(seq)
                continue
            kept.append(seq)
            chunk = min(seq.num_uncached, budget)
            if chunk == 0:
                continue  # a prefill with no budget left this step: it keeps its blocks
            slot = self._lora_slot(seq, step, busy)
            assert slot is not None, "a running sequence's adapter always holds its slot"
            self.blocks.append(seq)
            step.add(seq, slot, chunk)
            budget -= chunk
        self.running = kept

    def _preempt(self, seq: Sequence) -> None:
        self.preemptions += 1
        self.blocks.deallocate(seq)
        self.add(seq, front=True)

    def _wanted(self) -> int:
        """Adapters whose next request waits for a slot."""
        heads = [q[0].adapter for q in self.waiting.values() if q]
        return sum(1 for a in heads if a is not None and a.lora_slot is None and not a.error)

    def _admit(self, step: Step, busy: set[int]) -> None:
        budget = self.max_num_batched_tokens - step.num_tokens
        self.handing_over = self.lora_slots.to_hand_over(self._wanted(), busy, self.handing_over)
        progress = True
        while progress and budget > 0 and len(self.running) < self.max_running:
            progress = False
            for key in list(self.waiting):
                queue = self.waiting[key]
                if not queue or budget <= 0 or len(self.running) >= self.max_running:
                    continue
                seq = queue[0]
                if seq.adapter is not None and seq.adapter.error:
                    queue.popleft()
                    step.failed.append(seq)
                    continue
                if not self.blocks.can_allocate(seq):
                    continue
                if seq.adapter is not None and seq.adapter.uid in self.handing_over:
                    continue
                slot = self._lora_slot(seq, step, busy)
                if slot is None:
                    continue
                queue.popleft()
                self.blocks.allocate(seq)
                seq.status = Status.RUNNING
                self.running.append(seq)
                chunk = min(seq.num_uncached, budget)  # after the cached prefix, if any
                step.add(seq, slot, chunk)
                budget -= chunk
                # Round-robin: this adapter goes to the back of the line.
                self.waiting.move_to_end(key)
                progress = True
            for key in [k for k, q in self.waiting.items() if not q]:
                del self.waiting[key]
