"""LoRA expand for the 2 or 3 projections that share a shrink (q/k/v, gate/up), in one launch.

Each member's delta goes into its own output, as `lora_expand` would add it: the members'
n-tiles follow one another in the work items of one persistent grid, so a decoder layer
launches one expand per group instead of one per projection. Items run `lora_expand`'s own
item loop (`_expand_items`), so the two kernels agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from loraplane.runtime.kernels.lora_expand import BLOCK_N, BLOCK_R, EXPAND_CONFIGS, _expand_items
from loraplane.runtime.kernels.lora_shrink import exact_dot
from loraplane.runtime.kernels.segments import (
    LaunchConfig,
    LaunchTable,
    SegmentTiles,
    launch_config,
    persistent_programs,
)

# The group kernel runs its members' item loops one after another, and ptxas keeps more live
# across them: at decode up to 216 registers on sm90 and 248 on sm80 (the single kernel's 192
# at most), which is still 2 programs of 128 threads in an SM's 64K registers, as for the
# single kernel. Prefill takes 202-230 registers at one program per SM, as before.
EXPAND_GROUP_CONFIGS: LaunchTable = EXPAND_CONFIGS


@triton.jit
def _lora_expand_group_kernel(
    h_ptr,
    ranks_ptr,
    sorted_ptr,
    tile_slot_ptr,
    tile_start_ptr,
    tile_end_ptr,
    num_live_ptr,
    y0_ptr,
    y1_ptr,
    y2_ptr,
    b0_ptr,
    b1_ptr,
    b2_ptr,
    scales0_ptr,
    scales1_ptr,
    scales2_ptr,
    d_out0,
    d_out1,
    d_out2,
    rows,
    num_splits,
    stride_rm,
    stride_hs,
    stride_hm,
    stride_hr,
    stride_b0s,
    stride_b0n,
    stride_b1s,
    stride_b1n,
    stride_b2s,
    stride_b2n,
    stride_y0m,
    stride_y1m,
    stride_y2m,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr,
):
    # Member m: rank columns m * rows + [0, rank) of h, row m of ranks; a pair passes d_out2 = 0.
    # The members' item loops run one after another (the launch's items are still live tiles
    # times the members' n-tiles, each once), each with its pointers as they came in: picking
    # the member per item instead (branches, or selected pointers and strides) took as many
    # registers (ptxas -v: 124-168 at decode) and selects in every item.
    live_tiles = tl.load(num_live_ptr)
    for m in tl.static_range(3):
        if m == 0:
            b_ptr, y_ptr, scales_ptr, d_out = b0_ptr, y0_ptr, scales0_ptr, d_out0
            stride_bs, stride_bn, stride_ym = stride_b0s, stride_b0n, stride_y0m
        elif m == 1:
            b_ptr, y_ptr, scales_ptr, d_out = b1_ptr, y1_ptr, scales1_ptr, d_out1
            stride_bs, stride_bn, stride_ym = stride_b1s, stride_b1n, stride_y1m
        else:
            b_ptr, y_ptr, scales_ptr, d_out = b2_ptr, y2_ptr, scales2_ptr, d_out2
            stride_bs, stride_bn, stride_ym = stride_b2s, stride_b2n, stride_y2m
        _expand_items(
            h_ptr + m * rows * stride_hr,
            b_ptr,
            y_ptr,
            ranks_ptr + m * stride_rm,
            scales_ptr,
            sorted_ptr,
            tile_slot_ptr,
            tile_start_ptr,
            tile_end_ptr,
            live_tiles,
            d_out,
            num_splits,
            stride_hs,
            stride_hm,
            stride_hr,
            stride_bs,
            stride_bn,
            1,  # B's rank and y's column strides: the launcher asserts both are 1
            stride_ym,
            1,
            BLOCK_M,
            BLOCK_N,
            BLOCK_R,
            IEEE,
        )


def expand_group_programs(
    tiles: SegmentTiles,
    d_outs: Sequence[int],
    block_n: int,
    device: torch.device,
    config: LaunchConfig,
) -> int:
    n_tiles = sum(triton.cdiv(d, block_n) for d in d_outs)
    return persistent_programs(tiles.max_tiles * n_tiles, device, config)


def lora_expand_group(
    ys: Sequence[torch.Tensor],
    h: torch.Tensor,
    bs: Sequence[torch.Tensor],
    ranks: torch.Tensor,
    scales: Sequence[torch.Tensor],
    tiles: SegmentTiles,
    block_n: int | None = None,
    config: LaunchConfig | None = None,
) -> Sequence[torch.Tensor]:
    """lora_expand of each member of a shared-input group (lora/group.py) in one launch: ys[m]
    gets member m's delta from its columns of the group's shrink, in place. Returns ys.
    config overrides EXPAND_GROUP_CONFIGS."""
    # ys[m]: [tokens, d_out_m]  h: [splits, tokens, members * rows] fp32
    # bs[m]: [slots, d_out_m, r_max]  ranks: [members, slots] int32  scales[m]: [slots] fp32
    members = len(ys)
    assert members in (2, 3) and len(bs) == len(scales) == members, (members, len(bs))
    num_tokens = ys[0].shape[0]
    num_slots, _, r_max = bs[0].shape
    assert h.dim() == 3 and h.shape[1] == num_tokens and h.dtype == torch.float32, h.shape
    assert h.shape[2] % members == 0 and h.shape[2] // members >= r_max, (h.shape, r_max)
    assert ranks.shape == (members, num_slots) and ranks.dtype == torch.int32, ranks.shape
    assert ranks.stride(1) == 1, "each member's ranks need to be contiguous"
    dtype = bs[0].dtype
    assert dtype in (torch.float16, torch.bfloat16, torch.float32), dtype
    for m, (y, b, s) in enumerate(zip(ys, bs, scales, strict=True)):
        assert y.dim() == 2 and y.shape[0] == num_tokens, (m, y.shape, num_tokens)
        assert b.shape == (num_slots, y.shape[1], r_max), (m, b.shape, y.shape, r_max)
        assert y.dtype == b.dtype == dtype, (m, y.dtype, b.dtype, dtype)
        assert s.shape == (num_slots,) and s.dtype == torch.float32, (m, s.shape, s.dtype)
        assert y.stride(1) == 1 and b.stride(2) == 1, (
            f"member {m}: y and B need a contiguous last dim"
        )
        assert y.device == b.device == s.device == h.device == ranks.device, m
    assert tiles.num_tokens == num_tokens and tiles.num_slots == num_slots, (tiles, num_tokens)
    if num_tokens == 0:
        return ys
    config = config or launch_config(EXPAND_GROUP_CONFIGS, tiles, dtype)
    block_n = block_n or BLOCK_N[tiles.phase]
    d_outs = [y.shape[1] for y in ys]
    y3, b3, s3 = (list(v) + [v[-1]] * (3 - members) for v in (ys, bs, scales))  # a pair: unused
    grid = (expand_group_programs(tiles, d_outs, block_n, h.device, config),)
    _lora_expand_group_kernel[grid](
        h,
        ranks,
        tiles.sorted_tokens,
        tiles.tile_slot,
        tiles.tile_start,
        tiles.tile_end,
        tiles.num_live_tiles,
        *y3,
        *b3,
        *s3,
        *d_outs,
        *[0] * (3 - members),  # no items for a pair's third member
        h.shape[2] // members,
        h.shape[0],
        ranks.stride(0),
        h.stride(0),
        h.stride(1),
        h.stride(2),
        *(stride for b in b3 for stride in (b.stride(0), b.stride(1))),
        *(y.stride(0) for y in y3),
        BLOCK_M=tiles.block_m,
        BLOCK_N=block_n,
        BLOCK_R=BLOCK_R,
        IEEE=exact_dot(bs[0]),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return ys
