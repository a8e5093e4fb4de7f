"""LoRA shrink: h = x · A[slot]ᵀ for every token, each token with its own adapter slot.

Segmented (SGMV-style): a work item is one tile of up to BLOCK_M tokens of one slot, one
BLOCK_R slice of that slot's rank and one slice of d_in (split-K), and writes fp32 partial
sums. A persistent grid (segments.py) loops over the items up to the device-side count of live
tiles: padding tiles cost nothing, and a rank slice past the slot's true rank costs one loop
turn of two cached loads, not a CTA. Decode batches (one token per sequence, many slots) use
the same kernel with small tiles: the cost is reading A, which split-K spreads across the GPU.

Projections that read the same input (q/k/v, gate/up) can share one launch: their A slots
are stacked along the rank axis, `group_rows` apart, each with its own rank per slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplane.runtime.kernels.segments import (
    LaunchConfig,
    LaunchTable,
    SegmentTiles,
    launch_config,
    persistent_programs,
)

BLOCK_R = 16  # tl.dot's smallest tile; a rank-8 adapter masks half of it (masked loads are free)
BLOCK_K = 128  # decode streams A: 16 rank rows x 128 x 2 B per load, per program

# Not yet timed: picked from ptxas's register and spill counts (test_kernels_compile.py checks
# them for sm90 and sm80, with the unit strides specialized as they are at run time), to be
# tuned on a GPU (bench/kernels.py; `config=` tries one). Decode items stream [128, 16] slices
# of A beside [16, 128] of x: at 4 warps the 16-bit kernel takes 167 registers a thread on
# sm90 (vectorized loads of the contiguous rows), so 3 programs fit an SM's 64K registers, not
# 4; fp32 at 8 warps takes 94 on sm80: 2 programs. Prefill x tiles are [64, 128]: at 4 warps
# the bf16 kernel spills on sm80, at 8 warps it takes 231-251, one program an SM. fp32 prefill
# spills on sm80 with 2 or 3 stages and on sm90 with 2: one stage does not (164-244).
_DECODE = LaunchConfig(num_warps=4, num_stages=2, programs_per_sm=3)
_PREFILL = LaunchConfig(num_warps=8, num_stages=2, programs_per_sm=1)
SHRINK_CONFIGS: LaunchTable = {
    ("decode", torch.bfloat16): _DECODE,
    ("decode", torch.float16): _DECODE,
    ("decode", torch.float32): LaunchConfig(num_warps=8, num_stages=2, programs_per_sm=2),
    ("prefill", torch.bfloat16): _PREFILL,
    ("prefill", torch.float16): _PREFILL,
    ("prefill", torch.float32): LaunchConfig(num_warps=8, num_stages=1, programs_per_sm=1),
}


@triton.jit
def _lora_shrink_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    ranks_ptr,
    sorted_ptr,
    tile_slot_ptr,
    tile_start_ptr,
    tile_end_ptr,
    num_live_ptr,
    d_in,
    k_per_split,
    num_splits,
    rank_tiles,
    group_rows,
    stride_rg,
    stride_xm,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
    stride_os,
    stride_om,
    stride_or,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    live_tiles = tl.load(num_live_ptr)
    # Tile fastest, so programs running side by side share A slices in L2; the rank slice
    # slowest, so the dead slices of equal-rank slots form blocks the stride spreads evenly.
    for item in range(tl.program_id(0), live_tiles * num_splits * rank_tiles, tl.num_programs(0)):
        tile = item % live_tiles
        split = (item // live_tiles) % num_splits
        r0 = (item // (live_tiles * num_splits)) * BLOCK_R  # first row in the stacked A
        slot = tl.load(tile_slot_ptr + tile)  # >= 0: the live tiles come first
        member = r0 // group_rows  # which projection of a shared-input group
        local = r0 - member * group_rows
        rank = tl.load(ranks_ptr + member * stride_rg + slot)
        if local < rank:
            start = tl.load(tile_start_ptr + tile)
            end = tl.load(tile_end_ptr + tile)
            rows = start + tl.arange(0, BLOCK_M)
            m_mask = rows < end
            tokens = tl.load(sorted_ptr + rows, mask=m_mask, other=0).to(tl.int64)
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = local + tl.arange(0, BLOCK_R) < rank
            a_base = a_ptr + slot.to(tl.int64) * stride_as
            k_begin = split * k_per_split
            k_end = tl.minimum(k_begin + k_per_split, d_in)
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k in range(k_begin, k_end, BLOCK_K):
                offs_k = k + tl.arange(0, BLOCK_K)
                k_mask = offs_k < k_end
                x = tl.load(
                    x_ptr + tokens[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )  # [BLOCK_M, BLOCK_K]
                a = tl.load(
                    a_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                    mask=r_mask[None, :] & k_mask[:, None],
                    other=0.0,
                )  # [BLOCK_K, BLOCK_R]
                if IEEE:
                    acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(x, a)
            out = (
                out_ptr
                + split * stride_os
                + tokens[:, None] * stride_om
                + offs_r[None, :] * stride_or
            )
            tl.store(out, acc, mask=m_mask[:, None] & r_mask[None, :])


def exact_dot(x: torch.Tensor) -> bool:
    # fp32 inputs must not drop to tf32. CPU tensors only reach a kernel under the Triton
    # interpreter, whose tl.dot mishandles bf16: it gets the same products in fp32 there.
    return x.dtype == torch.float32 or x.device.type == "cpu"


def choose_split_k(tiles: SegmentTiles, d_in: int, r_max: int) -> int:
    # Few tiles (decode) leave most SMs idle while each item streams A alone: split d_in.
    # Decided on the bound, not the live tiles, which only the device knows.
    # Measured on an H200 (bench/kernels.py's sweep, 4096 -> r16, 64 tokens, BLOCK_K 128):
    # splits    1     2    4    8    16
    # N=1     15.3  8.9  5.8  4.1  3.2  us  (one adapter: few items, more splits, more SMs)
    # N=64    15.7  8.9  6.3  7.6  8.2  us  (64 adapters: enough items, splits add partials)
    # 8 splits is the compromise; 4 cost the engine's one-adapter step 0.7 ms (2026-11-29).
    items = tiles.max_tiles * triton.cdiv(r_max, BLOCK_R)
    if items >= 512 or d_in < 1024:
        return 1
    return min(8, triton.cdiv(d_in, 512))


def shrink_programs(
    tiles: SegmentTiles, rows: int, split_k: int, device: torch.device, config: LaunchConfig
) -> int:
    """The launch's grid: at most a few programs per SM, whatever the tiles, rows and splits."""
    work_bound = tiles.max_tiles * triton.cdiv(rows, BLOCK_R) * split_k
    return persistent_programs(work_bound, device, config)


def lora_shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    ranks: torch.Tensor,
    tiles: SegmentTiles,
    split_k: int | None = None,
    out: torch.Tensor | None = None,
    block_k: int = BLOCK_K,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Partial sums [split_k, tokens, rows] fp32, defined only at [:, t, :rank] of tokens with a slot.

    ranks [slots] for one projection; ranks [members, slots] for a shared-input group whose
    A rows are member-major, rows // members apart (a multiple of BLOCK_R). config overrides
    SHRINK_CONFIGS for this launch.
    """
    # x: [tokens, d_in]  a: [slots, rows, d_in]  ranks: [slots] or [members, slots] int32
    assert x.dim() == 2 and a.dim() == 3, (x.shape, a.shape)
    num_tokens, d_in = x.shape
    num_slots, r_max, a_d_in = a.shape
    ranks2 = ranks.view(1, -1) if ranks.dim() == 1 else ranks
    members = ranks2.shape[0]
    group_rows = r_max // members
    assert r_max % members == 0 and (members == 1 or group_rows % BLOCK_R == 0), (r_max, members)
    assert a_d_in == d_in, f"A has d_in {a_d_in}, x has {d_in}"
    assert x.dtype == a.dtype and x.dtype in (torch.float16, torch.bfloat16, torch.float32), (
        x.dtype,
        a.dtype,
    )
    assert x.device == a.device == ranks.device == tiles.tile_slot.device
    assert ranks2.shape == (members, num_slots) and ranks.dtype == torch.int32, ranks.shape
    assert ranks2.stride(1) == 1, ranks2.stride()
    assert tiles.num_tokens == num_tokens and tiles.num_slots == num_slots, (tiles, x.shape)
    assert x.stride(1) == 1 and a.stride(2) == 1, "x and A need a contiguous last dim"
    split_k = split_k or choose_split_k(tiles, d_in, r_max)
    if out is None:
        out = torch.empty(split_k, num_tokens, r_max, dtype=torch.float32, device=x.device)
    assert out.shape == (split_k, num_tokens, r_max) and out.dtype == torch.float32, out.shape
    if num_tokens == 0:
        return out
    config = config or launch_config(SHRINK_CONFIGS, tiles, x.dtype)
    k_per_split = triton.cdiv(triton.cdiv(d_in, split_k), block_k) * block_k
    grid = (shrink_programs(tiles, r_max, split_k, x.device, config),)
    _lora_shrink_kernel[grid](
        x,
        a,
        out,
        ranks,
        tiles.sorted_tokens,
        tiles.tile_slot,
        tiles.tile_start,
        tiles.tile_end,
        tiles.num_live_tiles,
        d_in,
        k_per_split,
        split_k,
        triton.cdiv(r_max, BLOCK_R),
        group_rows,
        ranks2.stride(0),
        x.stride(0),
        x.stride(1),
        a.stride(0),
        a.stride(1),
        a.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        BLOCK_M=tiles.block_m,
        BLOCK_R=BLOCK_R,
        BLOCK_K=block_k,
        IEEE=exact_dot(x),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def rank_mask(ranks: torch.Tensor, token_slots: torch.Tensor, r_max: int) -> torch.Tensor:
    # [tokens, r_max] bool: column j is live for a token when its slot exists and j < rank.
    valid = token_slots >= 0
    rank = torch.where(valid, ranks[token_slots.clamp(min=0).long()], 0)
    return torch.arange(r_max, device=ranks.device)[None, :] < rank[:, None]


def lora_shrink_ref(
    x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, token_slots: torch.Tensor
) -> torch.Tensor:
    """[tokens, r_max], fp32 (fp64 for fp64 inputs); zero past each rank and for tokens without slot."""
    # x: [tokens, d_in]  a: [slots, r_max, d_in]  token_slots: [tokens] (-1 = none)
    assert x.dim() == 2 and a.dim() == 3 and a.shape[2] == x.shape[1], (x.shape, a.shape)
    assert token_slots.shape == (x.shape[0],), (token_slots.shape, x.shape)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    gathered = a[token_slots.clamp(min=0).long()].to(compute)  # [tokens, r_max, d_in]
    h = torch.bmm(gathered, x.to(compute)[:, :, None])[:, :, 0]  # [tokens, r_max]
    live = rank_mask(ranks, token_slots, a.shape[1])  # rows past a rank are never read
    return torch.where(live, h, 0.0)
