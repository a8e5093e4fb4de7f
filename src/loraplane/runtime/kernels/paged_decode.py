"""Paged decode attention, split-KV (flash-decoding): one query per sequence
(kernels/paged_attention.py has the layout and the why)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from loraplane.runtime.kernels.lora_shrink import exact_dot
from loraplane.runtime.kernels.paged_common import (
    _attend_tile,
    _block_d,
    _check_cache,
    _check_out,
)

MIN_GROUP_ROWS = 16  # tl.dot's smallest M: a 4-head group pads to 16 rows (masked, free)
# Enough programs for two waves on an H100/H200 (132 SMs) before splitting the context.
TARGET_PROGRAMS = 256
MIN_SPLIT_POSITIONS = 256  # below this a split's fixed cost (q load, scratch write) dominates
MAX_SPLITS = 32  # one seq x 8 kv heads at 128k context: 4k positions per split


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    ctx_ptr,
    out_ptr,
    part_ptr,
    lse_ptr,
    qk_scale,
    stride_qs,
    stride_qh,
    stride_kp,
    stride_kh,
    stride_vp,
    stride_vh,
    stride_ts,
    stride_os,
    stride_oh,
    stride_ps,
    stride_ph,
    stride_pp,
    stride_ls,
    stride_lh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CACHE_BLOCK: tl.constexpr,
    WINDOW: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    lo = ctx * 0
    if WINDOW > 0:  # the query sits at ctx - 1 and sees ctx - WINDOW .. ctx - 1
        lo = tl.maximum(ctx - WINDOW, 0)
    tiles = (ctx - lo + BLOCK_N - 1) // BLOCK_N
    per_split = (tiles + NUM_SPLITS - 1) // NUM_SPLITS * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, ctx)  # <= start for splits past the context
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + offs_g
    hd_mask = (offs_g < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
        mask=hd_mask,
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    table_row = tables_ptr + seq * stride_ts
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        n_mask = pos < end
        acc, m, row_sum = _attend_tile(
            q, acc, m, row_sum, k_base, v_base, table_row, pos, n_mask, n_mask[None, :],
            stride_kp, stride_vp, offs_d, offs_d < HEAD_DIM, qk_scale, CACHE_BLOCK, IEEE,
        )  # fmt: skip
    # An empty split (or a padding row, context 0) has row_sum = 0 and acc = 0: it writes zeros.
    o = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    if NUM_SPLITS == 1:
        out = out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=hd_mask)
    else:
        lse = tl.where(row_sum > 0, m + tl.log2(tl.where(row_sum > 0, row_sum, 1.0)), float("-inf"))
        row = seq * stride_ps + heads * stride_ph + split * stride_pp
        tl.store(part_ptr + row[:, None] + offs_d[None, :], o, mask=hd_mask)
        tl.store(lse_ptr + seq * stride_ls + heads * stride_lh + split, lse, mask=offs_g < GROUP)


@triton.jit
def _decode_reduce_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    stride_ps,
    stride_ph,
    stride_pp,
    stride_ls,
    stride_lh,
    stride_os,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(
        lse_ptr + seq * stride_ls + head * stride_lh + offs_s,
        mask=offs_s < NUM_SPLITS,
        other=float("-inf"),
    )
    live = lse > float("-inf")
    top = tl.max(lse, 0)
    top = tl.where(top > float("-inf"), top, 0.0)  # every split empty: a padding row
    w = tl.where(live, tl.exp2(lse - top), 0.0)
    part = tl.load(
        part_ptr
        + seq * stride_ps
        + head * stride_ph
        + offs_s[:, None] * stride_pp
        + offs_d[None, :],
        mask=live[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    den = tl.sum(w, 0)
    o = tl.sum(w[:, None] * part, 0) / tl.where(den > 0, den, 1.0)
    out = out_ptr + seq * stride_os + head * stride_oh + offs_d
    tl.store(out, o.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def decode_tiles(fp32: bool) -> tuple[int, int]:
    # (BLOCK_N positions, num_warps). 64 positions x 128 dims x 2 B = 16 KB of K (and of V)
    # per load, over 4 warps: decode is memory-bound and a group tile is only 16 rows of
    # tl.dot. fp32 tiles (the GPU tests' precision) spill there at d = 128, and not over
    # twice the warps (test_kernels_compile.py).
    return (64, 8) if fp32 else (64, 4)


def choose_num_splits(seqs: int, kv_heads: int, max_blocks: int, block_size: int) -> int:
    # From shapes only (never context_lens on the device): a captured graph keeps its grid.
    programs = seqs * kv_heads
    if programs >= TARGET_PROGRAMS:
        return 1
    by_length = triton.cdiv(max_blocks * block_size, MIN_SPLIT_POSITIONS)
    return max(1, min(TARGET_PROGRAMS // programs, by_length, MAX_SPLITS))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_size: int,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """[seqs, heads, d] in q.dtype: each query at position context_lens[i] - 1; zeros where 0.

    out may be q itself: each program reads its own rows of q before any write to them.
    """
    # q: [seqs, heads, d]  block_tables: [seqs, max_blocks] int32  context_lens: [seqs] int32
    group = _check_cache(q, k_cache, v_cache, block_tables, context_lens, sliding_window)
    seqs, heads, d = q.shape
    kv_heads = k_cache.shape[1]
    assert block_tables.shape[0] == seqs, (block_tables.shape, q.shape)
    out = _check_out(q, out)
    if seqs == 0:
        return out
    splits = num_splits or choose_num_splits(seqs, kv_heads, block_tables.shape[1], block_size)
    assert splits >= 1, splits
    block_d = _block_d(d)
    block_n, warps = decode_tiles(q.dtype == torch.float32)
    # Unused with one split (the kernel writes out directly): one-row scratch keeps the launch.
    part = torch.empty(
        seqs if splits > 1 else 1, heads, splits, d, dtype=torch.float32, device=q.device
    )
    lse = torch.empty(part.shape[:3], dtype=torch.float32, device=q.device)
    _decode_split_kernel[(seqs, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part, lse,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1), part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        GROUP=group, HEAD_DIM=d, CACHE_BLOCK=block_size, WINDOW=sliding_window or 0,
        NUM_SPLITS=splits, BLOCK_G=max(MIN_GROUP_ROWS, triton.next_power_of_2(group)),
        BLOCK_N=block_n, BLOCK_D=block_d, IEEE=exact_dot(q), num_warps=warps,
    )  # fmt: skip
    if splits > 1:
        _decode_reduce_kernel[(seqs, heads)](
            part, lse, out,
            part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=d, NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return out
