"""Projections that read the same input (q/k/v, gate/up) share one shrink launch.

Their A slots live in one stacked buffer, member-major along the rank axis, and each
member's `lora_a`/`ranks` are views into it, so loading and clearing slots stay per layer.
The first member called in a step runs the shrink for all; the others find the result
keyed on the very input tensor and the step's batch, and only run their own expand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from loraplane.runtime.kernels.lora_shrink import BLOCK_R, lora_shrink
from loraplane.runtime.lora.batch import LoraBatch

if TYPE_CHECKING:
    from loraplane.runtime.lora.layer import LoraLinear

# Sibling names that transformers' Llama/Mistral/Qwen2 blocks (and ours) call on one input.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInputGroup:
    def __init__(self, members: list[LoraLinear]) -> None:
        first = members[0]
        assert len(members) > 1 and all(m.in_features == first.in_features for m in members)
        slots, r_max, d_in = first.lora_a.shape
        self.rows = -(-r_max // BLOCK_R) * BLOCK_R  # each member's rows, tile-aligned
        device, n = first.lora_a.device, len(members)
        self.a = torch.zeros(slots, n * self.rows, d_in, dtype=first.lora_a.dtype, device=device)
        self.ranks = torch.zeros(n, slots, dtype=torch.int32, device=device)
        for i, m in enumerate(members):
            m.lora_a = self.a[:, i * self.rows : i * self.rows + r_max]  # [slots, r_max, d_in]
            m.ranks = self.ranks[i]  # [slots]
            m.group, m.group_cols = self, slice(i * self.rows, i * self.rows + r_max)
        self._key: tuple[torch.Tensor, LoraBatch] | None = None
        self._h: torch.Tensor | None = None

    def shrink(self, x: torch.Tensor, x2: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        """[splits, tokens, members * rows] fp32 for x ([..., d_in], flattened as x2)."""
        if self._key is not None and self._key[0] is x and self._key[1] is batch:
            assert self._h is not None
            return self._h
        assert batch.tiles is not None
        self._h = lora_shrink(x2.contiguous(), self.a, self.ranks, batch.tiles)
        self._key = (x, batch)
        return self._h

    def forget(self) -> None:
        self._key, self._h = None, None
