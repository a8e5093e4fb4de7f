"""Paged varlen prefill attention for chunked prefill (kernels/paged_attention.py has the
layout and the why)."""

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


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    qsl_ptr,
    ctx_ptr,
    out_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kp,
    stride_kh,
    stride_vp,
    stride_vh,
    stride_ts,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CACHE_BLOCK: tl.constexpr,
    WINDOW: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    first = tl.program_id(0) * BLOCK_Q  # this tile's first query within its sequence
    kvh = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2).to(tl.int64)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if first >= q_len:  # tiles past a short sequence (the grid is sized by the longest)
        return
    ctx = tl.load(ctx_ptr + seq)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    qi = first + offs_m // GROUP  # row = query-major, head-minor within the group
    rows = (offs_m < BLOCK_Q * GROUP) & (qi < q_len)
    heads = kvh * GROUP + offs_m % GROUP
    q_pos = ctx - q_len + qi
    tokens = (q_start + qi).to(tl.int64)
    hd_mask = rows[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(
        q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=hd_mask,
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    hi = ctx - q_len + tl.minimum(first + BLOCK_Q, q_len)  # causal: up to the last query
    lo = hi * 0
    if WINDOW > 0:  # the tile's first query sees nothing before its window
        lo = tl.maximum(ctx - q_len + first - WINDOW + 1, 0)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    table_row = tables_ptr + seq * stride_ts
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        n_mask = pos < hi
        allowed = n_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            allowed = allowed & (q_pos[:, None] - pos[None, :] < WINDOW)
        acc, m, row_sum = _attend_tile(
            q, acc, m, row_sum, k_base, v_base, table_row, pos, n_mask, allowed,
            stride_kp, stride_vp, offs_d, offs_d < HEAD_DIM, qk_scale, CACHE_BLOCK, IEEE,
        )  # fmt: skip
    o = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]  # only padding rows have row_sum = 0
    out = out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out, o.to(out_ptr.dtype.element_ty), mask=hd_mask)


def prefill_tiles(group: int, d: int, fp32: bool = False) -> tuple[int, int, int]:
    # (BLOCK_M rows = queries x group heads, BLOCK_N positions, num_warps): FlashAttention-2's
    # tiles; the fp32 accumulator is BLOCK_M x d, so d = 256 halves both. fp32 inputs (IEEE
    # dots on CUDA cores, the GPU tests' precision) hold every operand tile in fp32 registers:
    # ptxas spills at 128 x 64 even for d = 32, and not at these (test_kernels_compile.py).
    if fp32:
        block_m, block_n, warps = (32, 32, 4) if d <= 128 else (16, 32, 4)
    else:
        block_m, block_n, warps = (128, 64, 8) if d <= 128 else (64, 32, 8)
    return max(block_m, triton.next_power_of_2(group)), block_n, warps


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    block_size: int,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """[tokens, heads, d] in q.dtype: causal, sequence i's queries at its last q_len positions.

    q_len <= context_lens[i] is the caller's to keep (checking it would read the device).
    out may be q itself: each program reads its own rows of q before any write to them.
    """
    # q: [tokens, heads, d]  query_start_loc: [seqs + 1] int32  context_lens: [seqs] int32
    group = _check_cache(q, k_cache, v_cache, block_tables, context_lens, sliding_window)
    tokens, _, d = q.shape
    seqs = context_lens.shape[0]
    assert query_start_loc.shape == (seqs + 1,), (query_start_loc.shape, seqs)
    assert query_start_loc.dtype == torch.int32, query_start_loc.dtype
    assert query_start_loc.stride(0) == 1 and query_start_loc.device == q.device
    assert max_query_len >= 0, max_query_len
    out = _check_out(q, out)
    if tokens == 0 or seqs == 0 or max_query_len == 0:
        return out
    block_m, block_n, warps = prefill_tiles(group, d, q.dtype == torch.float32)
    block_q = block_m // group
    grid = (triton.cdiv(max_query_len, block_q), k_cache.shape[1], seqs)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=d, CACHE_BLOCK=block_size, WINDOW=sliding_window or 0,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(d),
        IEEE=exact_dot(q), num_warps=warps,
    )  # fmt: skip
    return out
