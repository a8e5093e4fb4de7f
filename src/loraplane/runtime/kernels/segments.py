"""Group a batch's tokens by adapter slot into fixed-size row tiles, on the device, no host sync.

Every kernel program handles one tile: up to `block_m` tokens of one slot. The number of tiles
depends on the data, so the grid is sized by a bound that depends only on shapes,
cdiv(tokens, block_m) + min(tokens, slots); programs past the real tiles, and every token
without an adapter, exit at once. Fixed shapes and no .item() keep a step CUDA-graph capturable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SegmentTiles:
    num_tokens: int
    num_slots: int
    block_m: int
    sorted_tokens: torch.Tensor  # [tokens] int32: token ids, grouped by slot, no-adapter last
    counts: torch.Tensor  # [slots] int64: tokens of each slot (> 0 = an active slot)
    seg_start: torch.Tensor  # [slots] int64: where each slot's segment starts in sorted_tokens
    tile_slot: torch.Tensor  # [max_tiles] int32: the slot of each tile, -1 = idle program
    tile_start: torch.Tensor  # [max_tiles] int32: first row of the tile in sorted_tokens
    tile_end: torch.Tensor  # [max_tiles] int32: end of the tile's segment in sorted_tokens

    @property
    def max_tiles(self) -> int:
        return int(self.tile_slot.shape[0])


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
    valid = slot < num_slots
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
    )
