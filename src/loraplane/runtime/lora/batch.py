"""Per-step LoRA inputs: the batch (token → slot and its kernel tiles) and what sibling layers
share in a forward, in one object every layer is given at injection."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplane.runtime.kernels.segments import SegmentTiles, segment_tiles


@dataclass(frozen=True)
class LoraBatch:
    num_tokens: int
    # [tokens] int32 on the layers' device, -1 = base only; None when no token has an adapter
    token_slots: torch.Tensor | None
    tiles: SegmentTiles | None  # kernel tiles (Triton backend only)

    @property
    def no_adapter(self) -> bool:
        return self.token_slots is None


@dataclass
class SharedShrink:
    """One sibling group's shrink in this forward (lora/group.py), and who has not read it yet."""

    h: torch.Tensor  # [splits, tokens, members * rows] fp32
    unread: set[int]  # member indices


@dataclass
class LoraStep:
    """What every LoraLinear reads during a forward. The weight bank sets it; layers only read
    the batch, and groups keep their shared shrink here, so nothing outlives the step."""

    batch: LoraBatch | None = None
    shared: dict[int, SharedShrink] = field(default_factory=dict)  # group key → its shrink

    def start(self, batch: LoraBatch | None) -> None:
        self.batch = batch
        self.shared.clear()


def choose_block_m(num_tokens: int, active_slots: int) -> int:
    # Decode (about one token per slot) wastes most of a tile's rows: keep tiles small there;
    # prefill segments fill larger tensor-core tiles.
    per_slot = num_tokens / max(1, min(num_tokens, active_slots))
    return 16 if per_slot <= 32 else 64


def make_batch(
    token_slots: torch.Tensor,
    num_slots: int,
    device: torch.device,
    use_kernels: bool,
    graph_safe: bool = False,
) -> LoraBatch:
    # token_slots: [tokens] int, -1 = base only. graph_safe: never read the values, even of a
    # host tensor (what a CUDA graph captures; on a CPU, the same code path).
    if token_slots.dim() != 1 or token_slots.is_floating_point():
        raise ValueError(
            f"token_slots must be a 1-D integer tensor, got {token_slots.dtype} {tuple(token_slots.shape)}"
        )
    num_tokens = int(token_slots.shape[0])
    if token_slots.device.type == "cpu" and not graph_safe:
        # Host data can be checked for free; device data is trusted so a step never syncs.
        bad = (token_slots < -1) | (token_slots >= num_slots)
        if bool(bad.any()):
            raise ValueError(
                f"token_slots holds {token_slots[bad][:4].tolist()}, outside [-1, {num_slots})"
            )
        used = token_slots[token_slots >= 0]
        if used.numel() == 0:
            return LoraBatch(num_tokens=num_tokens, token_slots=None, tiles=None)
        block_m = choose_block_m(int(used.numel()), int(used.unique().numel()))
    else:
        block_m = choose_block_m(num_tokens, num_slots)  # shapes only: no sync
    slots = token_slots.to(device=device, dtype=torch.int32, non_blocking=True)
    tiles = None
    if use_kernels:
        tiles = segment_tiles(slots, num_slots, block_m)
    return LoraBatch(num_tokens=num_tokens, token_slots=slots, tiles=tiles)


def token_slots_for_rows(row_slots: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[batch] slots of padded [batch, seq_len] inputs → [batch * seq_len] per-token slots."""
    assert row_slots.dim() == 1, row_slots.shape
    return row_slots.repeat_interleave(seq_len)
