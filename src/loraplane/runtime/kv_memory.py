"""How many KV-cache blocks a GPU holds: pure arithmetic over what the driver and torch report
after the model runner's profiling forward (ModelRunner._size_kv_cache)."""

from __future__ import annotations


def graph_reserve_bytes(vocab_size: int, max_running: int) -> int:
    """Memory kept out of the KV cache for what the profiling forward does not allocate:
    the sampler's fp32 copies of a full batch's logits, and CUDA graphs' private pools."""
    return 4 * 4 * vocab_size * max_running + (512 << 20)


def kv_blocks_for_memory(
    *,
    total: int,
    free: int,
    reserved: int,
    peak: int,
    utilization: float,
    block_bytes: int,
    reserve: int,
) -> int:
    """KV blocks that fit in utilization of the card, beside this process's peak use.

    total, free: the device's, as the driver sees it (free counts other processes' use and
    the CUDA context as taken); reserved: what torch's allocator holds now; peak: the most
    this process allocated in the profiling forward, KV cache excluded.
    """
    others = max(0, total - free - reserved)  # other processes, the CUDA context, NCCL...
    budget = int(total * utilization) - others - peak - reserve
    return max(0, budget // block_bytes)
