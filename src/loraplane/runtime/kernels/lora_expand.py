"""LoRA expand: y[t] += scale[slot] · h[t] · B[slot]ᵀ, accumulated in place into the base output.

Same tiling as the shrink (a work item is one tile of tokens of one slot times a BLOCK_N slice
of d_out, looped over by a persistent grid up to the live tiles); the loop over rank stops at
the slot's true rank and the shrink's split-K partials are summed on load. Products run on
tensor cores in the adapter's dtype, sums in fp32. Every item adds into y, so each must run
exactly once: the tests check that on the sum. lora_expand_group.py launches the same item
loop (`_expand_items`) once per member of a q/k/v or gate/up group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplane.runtime.kernels.lora_shrink import exact_dot, rank_mask
from loraplane.runtime.kernels.segments import (
    LaunchConfig,
    LaunchTable,
    SegmentTiles,
    launch_config,
    persistent_programs,
)

BLOCK_R = 16
# The d_out slice of one work item. Decode: 256, measured on an H200 (bench/kernels.py's
# sweep, 4096 -> 4096 at rank 16, 64 tokens, 2 programs an SM, 2026-11-29):
# BLOCK_N      32    64    128   256
# N=64       38.6  28.2  19.9  11.4  us  (an item's fixed cost, its tile's metadata and h's
# N=1         4.5   4.0   3.8   3.7  us   partials, is paid over more columns)
# Prefill keeps 128: its [64, 128] fp32 accumulator already fills the registers.
BLOCK_N = {"decode": 256, "prefill": 128}

# Picked from ptxas's register and spill counts (test_kernels_compile.py checks them for sm90
# and sm80). A prefill item holds a [64, 128] fp32 accumulator and the y tile it adds to: at
# 4 warps that spills (16-144 bytes), at 8 warps it takes 172-195 registers a thread, one
# program per SM. Decode items are [16, 256]: up to 192 registers at 4 warps on sm90 (256 for
# fp32 on sm80), so 2 programs fit an SM. Not understood yet: an earlier sweep that launched
# 4 an SM (2 of them resident, by ptxas's count) ran the N=64 case in 8.6 us, not 11.4; 8
# warps at 2 an SM is untried. num_stages changed nothing measured (the rank loop is short).
_DECODE = LaunchConfig(num_warps=4, num_stages=2, programs_per_sm=2)
_PREFILL = LaunchConfig(num_warps=8, num_stages=2, programs_per_sm=1)
EXPAND_CONFIGS: LaunchTable = {
    ("decode", torch.bfloat16): _DECODE,
    ("decode", torch.float16): _DECODE,
    ("decode", torch.float32): _DECODE,
    ("prefill", torch.bfloat16): _PREFILL,
    ("prefill", torch.float16): _PREFILL,
    ("prefill", torch.float32): _PREFILL,
}


@triton.jit
def _add_item(
    h_ptr,
    b_ptr,
    y_ptr,
    ranks_ptr,
    scales_ptr,
    sorted_ptr,
    tile_start_ptr,
    tile_end_ptr,
    tile,
    slot,
    pid_n,
    d_out,
    num_splits,
    stride_hs,
    stride_hm,
    stride_hr,
    stride_bs,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One work item: the tile's tokens by the pid_n-th BLOCK_N slice of d_out, added into y."""
    rank = tl.load(ranks_ptr + slot)
    if rank > 0:
        scale = tl.load(scales_ptr + slot)
        start = tl.load(tile_start_ptr + tile)
        end = tl.load(tile_end_ptr + tile)
        rows = start + tl.arange(0, BLOCK_M)
        m_mask = rows < end
        tokens = tl.load(sorted_ptr + rows, mask=m_mask, other=0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < d_out
        b_base = b_ptr + slot.to(tl.int64) * stride_bs
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            hm = m_mask[:, None] & r_mask[None, :]
            h_rows = h_ptr + tokens[:, None] * stride_hm + offs_r[None, :] * stride_hr
            h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for s in range(0, num_splits):  # each split's partial: [BLOCK_M, BLOCK_R]
                h += tl.load(h_rows + s * stride_hs, mask=hm, other=0.0)
            b = tl.load(
                b_base + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                mask=n_mask[None, :] & r_mask[:, None],
                other=0.0,
            )  # [BLOCK_R, BLOCK_N]
            h = h.to(b.dtype)  # rounded as a layer of this dtype would round it
            if IEEE:
                acc += tl.dot(h.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(h, b)
        y_tile = y_ptr + tokens[:, None] * stride_ym + offs_n[None, :] * stride_yn
        ym = m_mask[:, None] & n_mask[None, :]
        y = tl.load(y_tile, mask=ym, other=0.0).to(tl.float32)
        tl.store(y_tile, (y + acc * scale).to(y_ptr.dtype.element_ty), mask=ym)


@triton.jit
def _expand_items(
    h_ptr,
    b_ptr,
    y_ptr,
    ranks_ptr,
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
    stride_br,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One projection's items (live tiles x n-tiles), spread over the persistent grid: the
    whole of `_lora_expand_kernel`, and one member's share of the group kernel's."""
    n_tiles = tl.cdiv(d_out, BLOCK_N)
    # Tile fastest: programs running side by side read the same slice of d_out of B.
    for item in range(tl.program_id(0), live_tiles * n_tiles, tl.num_programs(0)):
        tile = item % live_tiles
        slot = tl.load(tile_slot_ptr + tile)  # >= 0: the live tiles come first
        _add_item(
            h_ptr,
            b_ptr,
            y_ptr,
            ranks_ptr,
            scales_ptr,
            sorted_ptr,
            tile_start_ptr,
            tile_end_ptr,
            tile,
            slot,
            item // live_tiles,
            d_out,
            num_splits,
            stride_hs,
            stride_hm,
            stride_hr,
            stride_bs,
            stride_bn,
            stride_br,
            stride_ym,
            stride_yn,
            BLOCK_M,
            BLOCK_N,
            BLOCK_R,
            IEEE,
        )


@triton.jit
def _lora_expand_kernel(
    h_ptr,
    b_ptr,
    y_ptr,
    ranks_ptr,
    scales_ptr,
    sorted_ptr,
    tile_slot_ptr,
    tile_start_ptr,
    tile_end_ptr,
    num_live_ptr,
    d_out,
    num_splits,
    stride_hs,
    stride_hm,
    stride_hr,
    stride_bs,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr,
):
    _expand_items(
        h_ptr,
        b_ptr,
        y_ptr,
        ranks_ptr,
        scales_ptr,
        sorted_ptr,
        tile_slot_ptr,
        tile_start_ptr,
        tile_end_ptr,
        tl.load(num_live_ptr),
        d_out,
        num_splits,
        stride_hs,
        stride_hm,
        stride_hr,
        stride_bs,
        stride_bn,
        stride_br,
        stride_ym,
        stride_yn,
        BLOCK_M,
        BLOCK_N,
        BLOCK_R,
        IEEE,
    )


def expand_programs(
    tiles: SegmentTiles, d_out: int, block_n: int, device: torch.device, config: LaunchConfig
) -> int:
    """The launch's grid: at most a few programs per SM, whatever the tiles and d_out."""
    return persistent_programs(tiles.max_tiles * triton.cdiv(d_out, block_n), device, config)


def lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    b: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    tiles: SegmentTiles,
    block_n: int | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Add the LoRA delta into y in place and return y. block_n and config override
    BLOCK_N and EXPAND_CONFIGS."""
    # y: [tokens, d_out]  h: [splits, tokens, r_max] fp32  b: [slots, d_out, r_max]
    assert y.dim() == 2 and h.dim() == 3 and b.dim() == 3, (y.shape, h.shape, b.shape)
    num_tokens, d_out = y.shape
    num_slots, b_d_out, r_max = b.shape
    assert b_d_out == d_out, f"B has d_out {b_d_out}, y has {d_out}"
    assert h.shape[1:] == (num_tokens, r_max) and h.dtype == torch.float32, (h.shape, h.dtype)
    assert y.dtype == b.dtype and b.dtype in (torch.float16, torch.bfloat16, torch.float32), (
        y.dtype,
        b.dtype,
    )
    assert ranks.shape == (num_slots,) and ranks.dtype == torch.int32, (ranks.shape, ranks.dtype)
    assert scales.shape == (num_slots,) and scales.dtype == torch.float32, scales.dtype
    assert tiles.num_tokens == num_tokens and tiles.num_slots == num_slots, (tiles, y.shape)
    assert y.device == h.device == b.device == ranks.device == scales.device
    assert y.stride(1) == 1 and b.stride(2) == 1, "y and B need a contiguous last dim"
    if num_tokens == 0:
        return y
    config = config or launch_config(EXPAND_CONFIGS, tiles, b.dtype)
    block_n = block_n or BLOCK_N[tiles.phase]
    grid = (expand_programs(tiles, d_out, block_n, y.device, config),)
    _lora_expand_kernel[grid](
        h,
        b,
        y,
        ranks,
        scales,
        tiles.sorted_tokens,
        tiles.tile_slot,
        tiles.tile_start,
        tiles.tile_end,
        tiles.num_live_tiles,
        d_out,
        h.shape[0],
        h.stride(0),
        h.stride(1),
        h.stride(2),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        y.stride(0),
        y.stride(1),
        BLOCK_M=tiles.block_m,
        BLOCK_N=block_n,
        BLOCK_R=BLOCK_R,
        IEEE=exact_dot(b),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return y


def lora_expand_ref(
    y: torch.Tensor,
    h: torch.Tensor,
    b: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
) -> torch.Tensor:
    """y + scale · h · Bᵀ per token as a new tensor in y's dtype (fp32 math; fp64 for fp64)."""
    # y: [tokens, d_out]  h: [tokens, r_max]  b: [slots, d_out, r_max]  token_slots: [tokens]
    assert h.dim() == 2 and b.dim() == 3 and h.shape[1] == b.shape[2], (h.shape, b.shape)
    assert y.shape == (h.shape[0], b.shape[1]), (y.shape, h.shape, b.shape)
    compute = torch.float64 if y.dtype == torch.float64 else torch.float32
    index = token_slots.clamp(min=0).long()
    live = rank_mask(ranks, token_slots, b.shape[2])
    h = torch.where(live, h.to(compute), 0.0)  # never let unwritten columns leak
    delta = torch.bmm(b[index].to(compute), h[:, :, None])[:, :, 0]  # [tokens, d_out]
    delta = delta * scales[index].to(compute)[:, None]
    # Tokens without a slot read slot 0's B above (times zeros): mask, so a non-finite value
    # there can never reach a base-only token (0 * inf is NaN).
    delta = torch.where((token_slots >= 0)[:, None], delta, 0.0)
    return (y.to(compute) + delta).to(y.dtype)
