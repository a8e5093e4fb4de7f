"""Projections that read the same input (q/k/v, gate/up) share one shrink launch.

Their A rows live in one stacked buffer, member-major along the rank axis; each member's
`lora_a`/`ranks` are its own views into it, so loading and clearing slots stay per layer.

One shrink per group per forward: the first member called runs the shrink for all and leaves
it in the step (`LoraStep.shared`); each sibling then reads its own columns once. A member
that already read the current result is the first of the next forward, and runs a new shrink.
No tensor is compared and nothing is read back, so a CUDA graph captures the launch as it
captures any other. It is exact because the members read one input per forward, which is what
SHARED_INPUT lists.

A model that calls the members together (`project` in lora/layer.py, as ours does) skips
that protocol: one shrink and one expand launch for the whole group, nothing left in the step.
"""

from __future__ import annotations

import torch

from loraplane.runtime.kernels.lora_shrink import BLOCK_R, lora_shrink
from loraplane.runtime.kernels.segments import SegmentTiles
from loraplane.runtime.lora.batch import LoraStep, SharedShrink

# Sibling names that transformers' Llama/Mistral/Qwen2 blocks (and ours) call on one input.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInputGroup:
    def __init__(
        self,
        key: int,
        size: int,
        max_slots: int,
        max_rank: int,
        d_in: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        assert size > 1, size
        self.key = key  # its entry in LoraStep.shared
        self.size = size
        self.max_rank = max_rank
        self.rows = -(-max_rank // BLOCK_R) * BLOCK_R  # each member's rows, tile-aligned
        self.a = torch.zeros(max_slots, size * self.rows, d_in, dtype=dtype, device=device)
        self.ranks = torch.zeros(size, max_slots, dtype=torch.int32, device=device)

    def cols(self, member: int) -> slice:
        """member's rank columns of `a` and of the shrink output."""
        assert 0 <= member < self.size, member
        return slice(member * self.rows, member * self.rows + self.max_rank)

    def shrink_all(self, x2: torch.Tensor, tiles: SegmentTiles) -> torch.Tensor:
        """Every member's shrink of x2 in one launch: [splits, tokens, size * rows] fp32."""
        # x2: [tokens, d_in]
        return lora_shrink(x2.contiguous(), self.a, self.ranks, tiles)

    def shrink(self, member: int, x2: torch.Tensor, step: LoraStep) -> torch.Tensor:
        """member's [splits, tokens, max_rank] fp32 columns of the group's shrink of x2."""
        # x2: [tokens, d_in], the input every member reads in this forward
        shared = step.shared.get(self.key)
        if shared is None or member not in shared.unread:
            assert step.batch is not None and step.batch.tiles is not None
            h = self.shrink_all(x2, step.batch.tiles)
            shared = step.shared[self.key] = SharedShrink(h, set(range(self.size)))
        assert shared.h.shape[1] == x2.shape[0], (shared.h.shape, x2.shape)
        shared.unread.discard(member)
        return shared.h[:, :, self.cols(member)]
