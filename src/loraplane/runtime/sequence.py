"""A Sequence is plain state: its tokens, its blocks, its adapter, what it has emitted."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from loraplane.runtime.sampling import SamplingParams

_ids = itertools.count()


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
    num_cached: int = 0  # tokens whose k/v are in the cache
    num_committed: int = 0  # full blocks offered to the prefix cache (BlockManager.commit)
    block_hashes: list[bytes] = field(default_factory=list)  # digest of each full block's prefix
    started: bool = False  # has been in a forward pass (left the waiting queue once)
    text: str = ""  # output text streamed so far (stop strings cut off)
    decoded: str = ""  # output text decoded so far, some of it maybe not streamed yet
    prefix_offset: int = 0  # detokenizer window: output_ids[prefix_offset:read_offset] is
    read_offset: int = 0  # decoded already and is re-decoded as context for the next token
    finish_reason: str | None = None  # "stop" (eos or stop string) or "length" or "abort"
    stop_hit: str | None = None
    arrival: float = 0.0
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]

    def uncached_tokens(self, limit: int | None = None) -> list[int]:
        """The next tokens whose k/v are not in the cache yet, at most limit of them: one per
        decode, a chunk of the prompt in a chunked prefill, all of them after preemption."""
        n = len(self.prompt_ids)
        end = len(self) if limit is None else min(len(self), self.num_cached + limit)
        if self.num_cached >= n:
            return self.output_ids[self.num_cached - n : end - n]
        return (self.prompt_ids + self.output_ids)[self.num_cached : end]

    @property
    def num_uncached(self) -> int:
        return len(self) - self.num_cached

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def adapter_key(self) -> str:
        return self.adapter.name if self.adapter is not None else ""

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
