"""Paged attention: queries against a KV cache laid out in blocks, read through block tables.

The cache is flat, [kv_positions, kv_heads, head_dim] per layer; context position p of a
sequence lives at `block_table[p // block_size] * block_size + p % block_size`. Kernels look
up the block of every position of a KV tile, so a tile may span several cache blocks (or
part of one) and any block_size works. Offsets are int64: block ids times block_size times
the position stride pass 2**31 on a large card.

Grouped-query attention: a program takes every query head of one kv head at once, as rows
of one tile, so each K/V tile is read once per group rather than once per query head.

Decode (one query per sequence) is flash-decoding: grid (seqs, kv_heads, num_splits), each
split a contiguous share of its sequence's context (within the sliding window), writing a
normalised partial output and its log-sum-exp to fp32 scratch; a reduce kernel combines
them. num_splits comes from shapes only, so the launch is the same every step and a CUDA
graph can capture it: splits past a short context find no keys and write lse = -inf.

Prefill is varlen flash attention: grid (query tiles, kv_heads, seqs), a tile being up to
BLOCK_M // group queries times the group's heads; each sequence's queries are the last q_len
of its context (chunked prefill), causal, with the KV loop stopping at the tile's last query.

Only positions below a sequence's context (and inside its window) are ever loaded: an
unused position may hold NaN from a freed block's last owner, and 0 * NaN is NaN, so masked
positions are not loaded at all rather than loaded and multiplied by zero. Softmax runs in
the exp2 domain (scale folded with log2(e)); lse in scratch is in that domain too.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from loraplane.runtime.kernels.lora_shrink import exact_dot

DECODE_BLOCK_N = 64  # 64 positions x 128 dims x 2 B = 16 KB of K (and of V) per load
DECODE_WARPS = 4  # decode is memory-bound; a group tile is only 16 rows of tl.dot
MIN_GROUP_ROWS = 16  # tl.dot's smallest M: a 4-head group pads to 16 rows (masked, free)
# Enough programs for two waves on an H100/H200 (132 SMs) before splitting the context.
TARGET_PROGRAMS = 256
MIN_SPLIT_POSITIONS = 256  # below this a split's fixed cost (q load, scratch write) dominates
MAX_SPLITS = 32  # one seq x 8 kv heads at 128k context: 4k positions per split


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:  # probabilities go to the tensor cores in V's dtype, as in FlashAttention
        return tl.dot(a.to(b.dtype), b)


@triton.jit
def _attend_tile(
    q,
    acc,
    m,
    row_sum,
    k_base,
    v_base,
    table_row,
    pos,
    n_mask,
    allowed,
    stride_kp,
    stride_vp,
    offs_d,
    d_mask,
    qk_scale,
    CACHE_BLOCK: tl.constexpr,
    IEEE: tl.constexpr,
):
    # One KV tile of the online softmax; rows of q are (query, head) pairs.
    block = tl.load(table_row + pos // CACHE_BLOCK, mask=n_mask, other=0).to(tl.int64)
    slot = block * CACHE_BLOCK + pos % CACHE_BLOCK
    kt = tl.load(
        k_base + slot[None, :] * stride_kp + offs_d[:, None],
        mask=n_mask[None, :] & d_mask[:, None],
        other=0.0,
    )  # [BLOCK_D, BLOCK_N]
    v = tl.load(
        v_base + slot[:, None] * stride_vp + offs_d[None, :],
        mask=n_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_N, BLOCK_D]
    s = tl.where(allowed, _dot(q, kt, IEEE) * qk_scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    # A row that has seen no allowed key yet keeps m = -inf; -inf - -inf would be NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    row_sum = row_sum * alpha + tl.sum(p, 1)
    return acc * alpha[:, None] + _dot(p, v, IEEE), m_new, row_sum


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


def _check_cache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    sliding_window: int | None,
) -> int:
    # q: [rows, heads, d]  k_cache, v_cache: [kv_positions, kv_heads, d]; returns the group size
    assert q.dim() == 3 and k_cache.dim() == 3, (q.shape, k_cache.shape)
    assert k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    heads, d = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    assert heads % kv_heads == 0, f"{heads} query heads do not group over {kv_heads} kv heads"
    assert k_cache.shape[2] == d, f"cache head_dim {k_cache.shape[2]}, q head_dim {d}"
    assert q.dtype == k_cache.dtype == v_cache.dtype, (q.dtype, k_cache.dtype, v_cache.dtype)
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), q.dtype
    assert q.stride(2) == k_cache.stride(2) == v_cache.stride(2) == 1, "need a contiguous head_dim"
    assert block_tables.dim() == 2 and block_tables.dtype == torch.int32, block_tables.dtype
    assert block_tables.stride(1) == 1, block_tables.stride()
    assert context_lens.dim() == 1 and context_lens.dtype == torch.int32, context_lens.dtype
    assert context_lens.stride(0) == 1, context_lens.stride()
    assert context_lens.shape[0] == block_tables.shape[0], (context_lens.shape, block_tables.shape)
    assert q.device == k_cache.device == v_cache.device == block_tables.device
    assert context_lens.device == q.device, (context_lens.device, q.device)
    assert sliding_window is None or sliding_window > 0, sliding_window
    return heads // kv_heads


def _check_out(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.dtype == q.dtype, (out.shape, out.dtype, q.shape)
    assert out.stride(2) == 1 and out.device == q.device, out.stride()
    return out


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot's smallest K; d past it is masked


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
    # Unused with one split (the kernel writes out directly); tiny placeholders keep one launch.
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
        BLOCK_N=DECODE_BLOCK_N, BLOCK_D=block_d, IEEE=exact_dot(q), num_warps=DECODE_WARPS,
    )  # fmt: skip
    if splits > 1:
        _decode_reduce_kernel[(seqs, heads)](
            part, lse, out,
            part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=d, NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_D=block_d, num_warps=DECODE_WARPS,
        )  # fmt: skip
    return out


def prefill_tiles(group: int, d: int) -> tuple[int, int, int]:
    # (BLOCK_M rows = queries x group heads, BLOCK_N positions, num_warps): FlashAttention-2's
    # tiles; the fp32 accumulator is BLOCK_M x d, so d = 256 halves both.
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
    block_m, block_n, warps = prefill_tiles(group, d)
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


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_size: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """[tokens, heads, d] fp32 (fp64 for fp64 inputs); zero for sequences with context 0.

    Reads only the positions some query may see, as the kernels do, so a test can poison
    everything else.
    """
    # q: [tokens, heads, d]  k_cache, v_cache: [kv_positions, kv_heads, d]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=compute, device=q.device)
    starts, ctxs = query_start_loc.tolist(), context_lens.tolist()
    for i, c in enumerate(ctxs):
        s, e = starts[i], starts[i + 1]
        if c == 0 or s == e:
            continue
        q_pos = torch.arange(c - (e - s), c, device=q.device)
        lo = 0 if sliding_window is None else max(0, int(q_pos[0]) - sliding_window + 1)
        pos = torch.arange(lo, c, device=q.device)
        slots = block_tables[i].long()[pos // block_size] * block_size + pos % block_size
        k = k_cache[slots].to(compute).repeat_interleave(group, dim=1)  # [keys, heads, d]
        v = v_cache[slots].to(compute).repeat_interleave(group, dim=1)
        allowed = pos[None, :] <= q_pos[:, None]  # [queries, keys]
        if sliding_window is not None:
            allowed &= q_pos[:, None] - pos[None, :] < sliding_window
        scores = torch.einsum("qhd,khd->hqk", q[s:e].to(compute), k) * scale
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[s:e] = torch.einsum("hqk,khd->qhd", probs, v)
    return out
