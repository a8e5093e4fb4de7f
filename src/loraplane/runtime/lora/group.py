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
that protocol: one shrink and one expand launch for the whole group, nothing left in the step,
and one base GEMM: at injection the members' base weights (and biases) become views of one
concatenated tensor (`fuse_bases`), so the base model's parameters keep their names and
memory, and modules called one by one read the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        # The members' base weights and biases, concatenated: [sum d_out, d_in], [sum d_out].
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.widths: list[int] = []  # each member's d_out

    @torch.no_grad()
    def fuse_bases(self, bases: list[nn.Linear]) -> None:
        """Make the members' base weights (and biases) rows of one tensor, copied once: the
        originals are freed when nothing else holds them. Plain Linears only, alike in device
        and dtype, with a bias on all or none; otherwise they stay apart."""
        assert len(bases) == self.size, (len(bases), self.size)
        w0 = bases[0].weight
        plain = all(type(b) is nn.Linear and type(b.weight) is nn.Parameter for b in bases)
        alike = all(b.weight.device == w0.device and b.weight.dtype == w0.dtype for b in bases)
        biases = {b.bias is not None for b in bases}
        if not plain or not alike or w0.is_meta or len(biases) > 1:
            return
        self.weight = torch.cat([b.weight for b in bases])
        self.bias = (
            torch.cat([b.bias for b in bases if b.bias is not None])
            if bases[0].bias is not None
            else None
        )
        self.widths = [b.out_features for b in bases]
        row = 0
        for b, n in zip(bases, self.widths, strict=True):
            grad = b.weight.requires_grad
            b.weight = nn.Parameter(self.weight[row : row + n], requires_grad=grad)
            if self.bias is not None:
                b.bias = nn.Parameter(self.bias[row : row + n], requires_grad=grad)
            row += n

    def base(self, x: torch.Tensor, bases: list[nn.Linear]) -> tuple[torch.Tensor, ...]:
        """Every member's base output: one GEMM while their weights are still views of the
        fused ones (moving or re-assigning a parameter makes it a tensor of its own)."""
        if self.weight is None or not self._fused(bases):
            return tuple(b(x) for b in bases)
        y = F.linear(x, self.weight, self.bias)  # [..., sum d_out]
        return tuple(y.split(self.widths, dim=-1))

    def _fused(self, bases: list[nn.Linear]) -> bool:
        assert self.weight is not None
        w_row, size = self.weight.stride(0), self.weight.element_size()
        row = 0
        for b, n in zip(bases, self.widths, strict=True):
            if b.weight.data_ptr() != self.weight.data_ptr() + row * w_row * size:
                return False
            if self.bias is not None and (
                b.bias is None or b.bias.data_ptr() != self.bias.data_ptr() + row * size
            ):
                return False
            row += n
        return True

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
