"""Group a batch's tokens by adapter slot into fixed-size row tiles, on the device, no host sync,
and size the kernels' persistent grids.

A tile is up to `block_m` tokens of one slot. Live tiles are packed at the front of the tile
arrays and counted on the device (`num_live_tiles`); the arrays themselves are sized by a bound
on shapes only, cdiv(tokens, block_m) + min(tokens, slots), because their length cannot depend
on the data. Each kernel launches a fixed number of programs (a few per SM, never more than the
bound on work) that loop over work items up to the device-side count: the grid is known on the
host from shapes and device properties, so a step stays CUDA-graph capturable and never syncs,
and the number of CTAs no longer grows with the bound (one idle CTA per padding tile, rank tile
and split used to be ~850k per Llama-3-8B decode step).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

Phase = Literal["decode", "prefill"]
DECODE_MAX_BLOCK_M = 16  # lora/batch.py picks 16 for about a token per slot, 64 for prefill


@dataclass(frozen=True)
class SegmentTiles:
    num_tokens: int
    num_slots: int
    block_m: int
    sorted_tokens: torch.Tensor  # [tokens] int32: token ids, grouped by slot, no-adapter last
    counts: torch.Tensor  # [slots] int64: tokens of each slot (> 0 = an active slot)
    seg_start: torch.Tensor  # [slots] int64: where each slot's segment starts in sorted_tokens
    tile_slot: torch.Tensor  # [max_tiles] int32: the slot of each tile, -1 past the live ones
    tile_start: torch.Tensor  # [max_tiles] int32: first row of the tile in sorted_tokens
    tile_end: torch.Tensor  # [max_tiles] int32: end of the tile's segment in sorted_tokens
    num_live_tiles: torch.Tensor  # [1] int32: sum over slots of cdiv(count, block_m)

    @property
    def max_tiles(self) -> int:
        return int(self.tile_slot.shape[0])

    @property
    def phase(self) -> Phase:
        return "decode" if self.block_m <= DECODE_MAX_BLOCK_M else "prefill"


def max_tiles(num_tokens: int, num_slots: int, block_m: int) -> int:
    # Each active slot wastes at most one partial tile: sum(ceil(c_s / m)) <= ceil(T / m) + slots.
    return -(-num_tokens // block_m) + min(num_tokens, num_slots)


def segment_tiles(token_slots: torch.Tensor, num_slots: int, block_m: int) -> SegmentTiles:
    # token_slots: [tokens] int, -1 = base only
    assert token_slots.dim() == 1, token_slots.shape
    assert not token_slots.is_floating_point(), token_slots.dtype
    assert block_m > 0 and num_slots > 0, (block_m, num_slots)
    device = token_slots.device
    num_tokens = int(token_slots.shape[0])
    key = torch.where(token_slots < 0, num_slots, token_slots.long())  # [tokens] in [0, slots]
    sorted_tokens = torch.sort(key, stable=True).indices.to(torch.int32)
    counts = torch.zeros(num_slots + 1, dtype=torch.long, device=device)
    counts.index_add_(0, key, torch.ones_like(key))
    counts = counts[:num_slots]  # [slots]; tokens without adapter get no tiles
    seg_end = torch.cumsum(counts, 0)
    seg_start = seg_end - counts
    tiles = (counts + block_m - 1) // block_m
    tiles_end = torch.cumsum(tiles, 0)
    tiles_begin = tiles_end - tiles
    tile = torch.arange(max_tiles(num_tokens, num_slots, block_m), device=device)
    slot = torch.searchsorted(tiles_end, tile, right=True)  # [max_tiles] in [0, slots]
    valid = slot < num_slots  # exactly tile < tiles_end[-1]: the live tiles come first
    slot = slot.clamp(max=num_slots - 1)
    start = seg_start[slot] + (tile - tiles_begin[slot]) * block_m
    return SegmentTiles(
        num_tokens=num_tokens,
        num_slots=num_slots,
        block_m=block_m,
        sorted_tokens=sorted_tokens,
        counts=counts,
        seg_start=seg_start,
        tile_slot=torch.where(valid, slot, -1).to(torch.int32),
        tile_start=torch.where(valid, start, 0).to(torch.int32),
        tile_end=torch.where(valid, seg_end[slot], 0).to(torch.int32),
        num_live_tiles=tiles_end[-1:].to(torch.int32),
    )


@dataclass(frozen=True)
class LaunchConfig:
    """How one kernel launches for one (phase, dtype): Triton's warps and pipeline stages, and
    the persistent grid's programs per SM."""

    num_warps: int
    num_stages: int
    programs_per_sm: int

    def __post_init__(self) -> None:
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps {self.num_warps} is not a power of two in [1, 16]")
        if self.num_stages < 1 or self.programs_per_sm < 1:
            raise ValueError(f"num_stages and programs_per_sm must be >= 1, got {self}")


LaunchTable = dict[tuple[Phase, torch.dtype], LaunchConfig]


def launch_config(table: LaunchTable, tiles: SegmentTiles, dtype: torch.dtype) -> LaunchConfig:
    return table[(tiles.phase, dtype)]


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def sm_count(device: torch.device) -> int:
    # The interpreter (CPU) has no SMs: counting one keeps its grids tiny, so every CPU test
    # runs the work loop with several items per program.
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def persistent_programs(work_bound: int, device: torch.device, config: LaunchConfig) -> int:
    """Programs to launch for at most work_bound work items: a few per SM, fewer if less work can
    exist. Shapes and device properties only, so the same grid serves every step of a graph."""
    return max(1, min(work_bound, config.programs_per_sm * sm_count(device)))
