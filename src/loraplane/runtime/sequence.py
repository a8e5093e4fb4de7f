"""A Sequence is plain state: its tokens, its blocks, its adapter, what it has emitted."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from loraplane.runtime.sampling import SamplingParams

_ids = itertools.count()
# The host's stand-in for a sampled token it has not read back yet (async scheduling): never
# a valid id, so an input the runner failed to take from the device fails loudly.
PLACEHOLDER = -2


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: Any = None  # an AdapterEntry, or None for the base model
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose k/v are in the cache, or written by a step launched
    num_committed: int = 0  # full blocks offered to the prefix cache (BlockManager.commit)
    block_hashes: list[bytes] = field(default_factory=list)  # digest of each full block's prefix
    # 1 while the token a launched step samples for this sequence is on the device only: it
    # counts in len() (positions, blocks), and as an input the runner takes it from the device.
    num_pending: int = 0
    started: bool = False  # has been in a forward pass (left the waiting queue once)
    finish_reason: str | None = None  # "stop" (eos or stop string) or "length" or "abort"
    arrival: float = 0.0
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def tokens(self) -> list[int]:
        """The tokens the host knows: a pending one is not among them."""
        return self.prompt_ids + self.output_ids

    def token_at(self, position: int) -> int:
        n = len(self.prompt_ids)
        if position < n:
            return self.prompt_ids[position]
        return self.output_ids[position - n] if position - n < len(self.output_ids) else PLACEHOLDER

    def uncached_tokens(self, limit: int | None = None) -> list[int]:
        """The next tokens whose k/v are not in the cache yet, at most limit of them: one per
        decode, a chunk of the prompt in a chunked prefill, all of them after preemption. A
        pending token is PLACEHOLDER."""
        n = len(self.prompt_ids)
        end = len(self) if limit is None else min(len(self), self.num_cached + limit)
        if self.num_cached >= n:
            new = self.output_ids[self.num_cached - n : end - n]
        else:
            new = (self.prompt_ids + self.output_ids)[self.num_cached : end]
        return new + [PLACEHOLDER] * (end - self.num_cached - len(new))

    def room(self, max_seq_len: int) -> int:
        """Tokens this sequence may still take before max_tokens or max_seq_len ends it (a
        pending one counts as taken)."""
        return min(
            self.params.max_tokens - len(self.output_ids) - self.num_pending,
            max_seq_len - len(self),
        )

    @property
    def num_uncached(self) -> int:
        return len(self) - self.num_cached

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def adapter_key(self) -> str:
        return self.adapter.name if self.adapter is not None else ""

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
