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

import torch

from loraplane.runtime.kernels.paged_decode import choose_num_splits, paged_decode_attention
from loraplane.runtime.kernels.paged_prefill import paged_prefill_attention, prefill_tiles

__all__ = [
    "choose_num_splits",
    "paged_attention_ref",
    "paged_decode_attention",
    "paged_prefill_attention",
    "prefill_tiles",
]


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
