"""What the paged attention kernels share: one K/V tile's online-softmax update, the dot with
the fp32 switch, and the checks of the cache and outputs (kernels/paged_attention.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
