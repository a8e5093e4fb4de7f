"""Hands out KV-cache blocks to sequences; the cache itself lives in the model runner."""

from __future__ import annotations

from collections import deque

from loraplane.runtime.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(num_blocks))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_for(len(seq)) <= len(self.free)

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        seq.block_table = [self.free.popleft() for _ in range(self.blocks_for(len(seq)))]

    def can_append(self, seq: Sequence) -> bool:
        # Before a decode step the blocks must cover every token, the newest included; a new
        # block is needed only when the last one is full.
        return len(seq) <= len(seq.block_table) * self.block_size or bool(self.free)

    def append(self, seq: Sequence) -> None:
        if len(seq) > len(seq.block_table) * self.block_size:
            seq.block_table.append(self.free.popleft())

    def deallocate(self, seq: Sequence) -> None:
        self.free.extend(seq.block_table)
        seq.block_table = []
        seq.num_cached = 0

    @property
    def num_free(self) -> int:
        return len(self.free)
