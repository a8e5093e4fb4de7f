"""Hands out KV-cache blocks to sequences, and shares full blocks of identical prefixes.

The cache itself lives in the model runner; this is its bookkeeping. A block is reference
counted: sequences that start with the same tokens under the same adapter share the blocks of
that prefix (prefix caching). A block is shared only once it is full and computed, keyed by a
hash of its tokens, the hash of the block before it (so a block stands for its whole prefix)
and the adapter instance: k/v depend on the adapter's k_proj/v_proj, and one team's cached
prefix must never answer, or time, another team's request. Requests to the base model alone
share among themselves.

A freed block keeps its contents and hash until it is handed out again, so a prompt that comes
back soon still finds it. Free blocks are reused least recently freed first, and a sequence
frees its last block first: what is evicted first is the end of a prefix, never its start.

Admission keeps `watermark_blocks` free so that running sequences can still grow a block
each without being preempted the very next step (preemption thrash).
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict

from loraplane.runtime.sequence import Sequence


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        prefix_caching: bool = True,
        watermark_blocks: int = 0,
    ) -> None:
        assert num_blocks > 0 and block_size > 0 and 0 <= watermark_blocks < num_blocks
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.watermark_blocks = watermark_blocks
        self.refs = [0] * num_blocks
        # Blocks nobody holds, oldest free first; their values are None (an ordered set).
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.secret = os.urandom(16)  # per process: digests cannot be precomputed elsewhere
        self.hash_of: dict[int, bytes] = {}  # block -> the digest it is cached under
        self.cached: dict[bytes, int] = {}  # digest -> block
        self.hits = 0  # tokens found in the cache at admission
        self.queries = 0  # prompt tokens looked up at admission

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self.free)

    # -- prefix hashes --------------------------------------------------------------------------

    def _hashes(self, seq: Sequence, full_blocks: int) -> list[bytes]:
        """Hashes of seq's first full_blocks blocks, extending the ones it already has."""
        bs = self.block_size
        tokens = seq.tokens
        key = b"%d" % seq.adapter.uid if seq.adapter is not None else b"base"
        while len(seq.block_hashes) < full_blocks:
            i = len(seq.block_hashes)
            # A keyed cryptographic digest, not hash(): a prompt crafted to collide with another
            # request's block would otherwise be answered from that block.
            h = hashlib.blake2b(digest_size=16, key=self.secret)
            h.update(seq.block_hashes[-1] if seq.block_hashes else key)
            h.update(array("q", tokens[i * bs : (i + 1) * bs]).tobytes())
            seq.block_hashes.append(h.digest())
        return seq.block_hashes[:full_blocks]

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding seq's longest cached prefix. The last token is never taken from the
        cache: its logits are what the step is for, and recomputing it must not write into a
        block another sequence reads."""
        if not self.prefix_caching:
            return []
        found = []
        for h in self._hashes(seq, (len(seq) - 1) // self.block_size):
            block = self.cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    # -- admission, growth, release ---------------------------------------------------------------

    def can_allocate(self, seq: Sequence) -> bool:
        """Blocks for all of seq's tokens fit, leaving the watermark free."""
        shared = self._cached_prefix(seq)
        reclaimed = sum(1 for b in shared if self.refs[b] == 0)  # counted in free today
        needed = self.blocks_for(len(seq)) - len(shared)
        return needed + reclaimed + self.watermark_blocks <= len(self.free)

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token of seq; the cached prefix is shared and marked computed."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        shared = self._cached_prefix(seq)
        for block in shared:
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1
        seq.block_table = shared + [
            self._take() for _ in range(self.blocks_for(len(seq)) - len(shared))
        ]
        seq.num_cached = len(shared) * self.block_size
        self.queries += len(seq)
        self.hits += seq.num_cached

    def can_append(self, seq: Sequence) -> bool:
        # Before a decode step the blocks must cover every token, the newest included; a new
        # block is needed only when the last one is full.
        return len(seq) <= len(seq.block_table) * self.block_size or bool(self.free)

    def append(self, seq: Sequence) -> None:
        if len(seq) > len(seq.block_table) * self.block_size:
            seq.block_table.append(self._take())

    def commit(self, seq: Sequence, computed: int | None = None) -> None:
        """Offer seq's newly full, computed blocks to later sequences (after a forward).

        computed: the tokens a finished step left in the cache (default num_cached, which may
        count a step still running). Only blocks whose token ids the host knows are hashed: a
        pending token's is on the device alone.
        """
        if not self.prefix_caching:
            return
        known = len(seq.prompt_ids) + len(seq.output_ids)
        limit = seq.num_cached if computed is None else min(computed, seq.num_cached)
        full = min(limit, known) // self.block_size
        start = seq.num_committed
        if full <= start:
            return
        for i, h in enumerate(self._hashes(seq, full)[start:], start):
            block = seq.block_table[i]
            if h not in self.cached and block not in self.hash_of:
                self.cached[h] = block
                self.hash_of[block] = h
        seq.num_committed = full

    def deallocate(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.refs[block] -= 1
            assert self.refs[block] >= 0, f"block {block} freed twice"
            if self.refs[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.num_cached = 0
        seq.num_committed = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: blocks in use stay with their sequences."""
        self.cached.clear()
        self.hash_of.clear()

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.hash_of.pop(block, None)
        if h is not None:
            del self.cached[h]  # its contents are about to be overwritten
        self.refs[block] = 1
        return block
