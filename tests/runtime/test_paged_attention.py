"""Paged decode and prefill attention kernels against a torch reference, the reference against
dense SDPA.

Caches are built the way a long-running server leaves them: blocks shuffled across the cache,
tables wider than any sequence needs, and every position no sequence owns (the tail of a last
block, free blocks, spare table entries) holding NaN, so any read the kernels should not make
shows up in the output. Every run draws new inputs; the seed is in every failure message so a
failure can be replayed with LORAPLANE_TEST_SEED=<seed>.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from loraplane.runtime.kernels.paged_attention import (
    choose_num_splits,
    paged_attention_ref,
    paged_decode_attention,
    paged_prefill_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter converts fp32 to bf16 by truncation, not round-to-nearest (see test_kernels).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2 if DEVICE == "cpu" else 1e-2}
GROUPS = [(8, 2), (4, 4)]  # (heads, kv_heads): GQA 4:1 and plain multi-head
# Crossing the decode tile (64) and cache blocks; 0 is a padding row.
DECODE_CTX = [1, 4, 16, 17, 63, 64, 65, 130, 0]


def fresh_seed() -> int:
    return int(os.environ.get("LORAPLANE_TEST_SEED") or random.SystemRandom().randrange(2**31))


@dataclass
class Paged:
    q: torch.Tensor  # [tokens, heads, d]
    k_cache: torch.Tensor  # [kv_positions, kv_heads, d]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [seqs, max_blocks] int32
    query_start_loc: torch.Tensor  # [seqs + 1] int32
    context_lens: torch.Tensor  # [seqs] int32
    block_size: int

    @property
    def scale(self) -> float:
        return self.q.shape[2] ** -0.5

    def ref(self, window: int | None = None) -> torch.Tensor:
        return paged_attention_ref(
            self.q, self.k_cache, self.v_cache, self.block_tables, self.query_start_loc,
            self.context_lens, self.scale, self.block_size, window,
        )  # fmt: skip

    def decode(self, window: int | None = None, **kw) -> torch.Tensor:
        return paged_decode_attention(
            self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens,
            self.scale, self.block_size, window, **kw,
        )  # fmt: skip

    def prefill(self, window: int | None = None, **kw) -> torch.Tensor:
        q_lens = self.query_start_loc.diff()
        return paged_prefill_attention(
            self.q, self.k_cache, self.v_cache, self.block_tables, self.query_start_loc,
            self.context_lens, int(q_lens.max()), self.scale, self.block_size, window, **kw,
        )  # fmt: skip


def paged_case(
    gen: torch.Generator,
    ctx_lens: list[int],
    q_lens: list[int],
    heads: int,
    kv_heads: int,
    d: int,
    block_size: int,
    dtype: torch.dtype,
) -> Paged:
    need = [-(-c // block_size) for c in ctx_lens]
    width = max(need) + 2  # tables wider than any sequence needs, as the runner pads them
    num_blocks = sum(need) + 4  # a few free blocks nobody owns
    order = torch.randperm(num_blocks, generator=gen).tolist()
    poison = order.pop()  # spare table entries point at a free, NaN block
    tables = torch.full((len(ctx_lens), width), poison, dtype=torch.int32)
    shape = (num_blocks * block_size + 1, kv_heads, d)  # + the runner's zero position
    k = torch.full(shape, float("nan"), dtype=dtype)
    v = torch.full(shape, float("nan"), dtype=dtype)
    k[-1], v[-1] = 0, 0
    for i, c in enumerate(ctx_lens):
        tables[i, : need[i]] = torch.tensor(order[: need[i]], dtype=torch.int32)
        del order[: need[i]]
        pos = torch.arange(c)
        slots = tables[i, pos // block_size].long() * block_size + pos % block_size
        k[slots] = torch.randn(c, kv_heads, d, generator=gen).to(dtype)
        v[slots] = torch.randn(c, kv_heads, d, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), heads, d, generator=gen).to(dtype)
    qsl = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    for i, c in enumerate(ctx_lens):
        if c == 0:  # a padding row's query is garbage: it must never reach anything
            q[qsl[i] : qsl[i + 1]] = float("nan")
    return Paged(
        *(t.to(DEVICE) for t in (q, k, v, tables, qsl)),
        torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE),
        block_size,
    )


def assert_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, seed: int) -> None:
    assert not got.isnan().any(), f"NaN in the output (seed {seed})"
    torch.testing.assert_close(
        got.float(),
        want.float(),
        atol=TOL[dtype],
        rtol=TOL[dtype],
        msg=lambda m: f"{m} (seed {seed})",
    )


def poison_outside_window(c: Paged, first_q_pos: list[int], window: int) -> None:
    # A runner may free the blocks that left every window; the kernels must not read them.
    for i, p in enumerate(first_q_pos):
        pos = torch.arange(max(0, p - window + 1), device=DEVICE)
        slots = c.block_tables[i, pos // c.block_size].long() * c.block_size + pos % c.block_size
        c.k_cache[slots], c.v_cache[slots] = float("nan"), float("nan")


@pytest.mark.parametrize("window", [None, 5])
def test_reference_is_dense_causal_sdpa_on_a_contiguous_sequence(window):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    t, heads, kv_heads, d, bs = 13, 4, 2, 16, 4
    q = torch.randn(t, heads, d, generator=gen, dtype=torch.float64)
    k = torch.randn(t, kv_heads, d, generator=gen, dtype=torch.float64)
    v = torch.randn(t, kv_heads, d, generator=gen, dtype=torch.float64)
    i = torch.arange(t)
    mask = i[None, :] <= i[:, None]
    if window is not None:
        mask &= i[:, None] - i[None, :] < window
    dense = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True
    ).transpose(0, 1)  # [t, heads, d]
    # Contiguous: block j holds positions 4j..4j+3, and the runner's zero position after them.
    pad = torch.zeros(-(-t // bs) * bs + 1 - t, kv_heads, d, dtype=torch.float64)
    k_cache, v_cache = torch.cat([k, pad]), torch.cat([v, pad])
    table = torch.arange(-(-t // bs), dtype=torch.int32)[None]
    ctx = torch.tensor([t], dtype=torch.int32)
    for q_len in (t, 5, 1):  # the whole prompt, a last chunk, a decode step
        qsl = torch.tensor([0, q_len], dtype=torch.int32)
        got = paged_attention_ref(
            q[t - q_len :], k_cache, v_cache, table, qsl, ctx, d**-0.5, bs, window
        )
        torch.testing.assert_close(got, dense[t - q_len :], msg=lambda m: f"{m} (seed {seed})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads"), GROUPS)
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference(dtype, heads, kv_heads, block_size, num_splits):
    seed = fresh_seed()
    c = paged_case(
        torch.Generator().manual_seed(seed), DECODE_CTX, [1] * len(DECODE_CTX),
        heads, kv_heads, 16, block_size, dtype,
    )  # fmt: skip
    got = c.decode(num_splits=num_splits)
    assert_matches(got, c.ref(), dtype, seed)
    assert torch.equal(got[-1], torch.zeros_like(got[-1])), "a padding row must be zeros"


def test_decode_split_counts_agree():
    seed = fresh_seed()
    ctx = [1, 50, 64, 129, 200, 0]
    c = paged_case(torch.Generator().manual_seed(seed), ctx, [1] * 6, 8, 2, 32, 8, torch.float32)
    want = c.ref()
    one = c.decode(num_splits=1)
    for splits in (2, 5, 16):  # 16 splits: most are past every context here
        got = c.decode(num_splits=splits)
        assert_matches(got, want, torch.float32, seed)
        assert_matches(got, one, torch.float32, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads"), GROUPS)
@pytest.mark.parametrize("block_size", [4, 16])
def test_chunked_prefill_matches_reference(dtype, heads, kv_heads, block_size):
    seed = fresh_seed()
    # Whole prompts, chunks at the tail of longer contexts, a decode-like single query, and
    # 130 queries to cross a query tile even for 1:1 groups (128 rows).
    q_lens = [1, 7, 40, 130, 33, 1]
    ctx = [1, 7, 100, 130, 103, 65]
    c = paged_case(
        torch.Generator().manual_seed(seed), ctx, q_lens, heads, kv_heads, 16, block_size, dtype
    )
    assert_matches(c.prefill(), c.ref(), dtype, seed)


@pytest.mark.parametrize("window", [5, 40])
def test_sliding_window_reads_nothing_outside_it(window):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    ctx = [1, 6, 64, 150]
    dec = paged_case(gen, ctx, [1] * 4, 8, 2, 16, 4, torch.float32)
    poison_outside_window(dec, [n - 1 for n in ctx], window)
    want = dec.ref(window)
    for splits in (1, 3):
        assert_matches(dec.decode(window, num_splits=splits), want, torch.float32, seed)
    q_lens, ctx = [1, 6, 50, 70], [1, 6, 64, 150]
    pre = paged_case(gen, ctx, q_lens, 8, 2, 16, 4, torch.float32)
    poison_outside_window(pre, [n - q for n, q in zip(ctx, q_lens, strict=True)], window)
    assert_matches(pre.prefill(window), pre.ref(window), torch.float32, seed)


def test_odd_head_dim_and_block_size():
    # head_dim 24 pads to 32 lanes (masked); a block of 5 positions never aligns with a tile.
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    dec = paged_case(gen, [3, 70, 0], [1] * 3, 6, 2, 24, 5, torch.float32)
    for splits in (1, 2):
        assert_matches(dec.decode(num_splits=splits), dec.ref(), torch.float32, seed)
    pre = paged_case(gen, [3, 70], [3, 20], 6, 2, 24, 5, torch.float32)
    assert_matches(pre.prefill(), pre.ref(), torch.float32, seed)


def test_out_may_be_q_itself():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    dec = paged_case(gen, [5, 80, 0], [1] * 3, 8, 2, 16, 4, torch.float32)
    for splits in (1, 3):
        want, q = dec.ref(), dec.q.clone()
        got = dec.decode(num_splits=splits, out=dec.q)
        assert got.data_ptr() == dec.q.data_ptr()
        assert_matches(got, want, torch.float32, seed)
        dec.q = q
    pre = paged_case(gen, [5, 80], [5, 40], 8, 2, 16, 4, torch.float32)
    want = pre.ref()
    assert_matches(pre.prefill(out=pre.q), want, torch.float32, seed)


def test_num_splits_fill_the_gpu_only_when_the_batch_does_not():
    assert choose_num_splits(seqs=256, kv_heads=8, max_blocks=256, block_size=16) == 1
    assert choose_num_splits(seqs=1, kv_heads=8, max_blocks=8192, block_size=16) == 32
    assert choose_num_splits(seqs=4, kv_heads=8, max_blocks=256, block_size=16) == 8
    assert choose_num_splits(seqs=1, kv_heads=8, max_blocks=4, block_size=16) == 1  # short


LLAMA3_8B = {"heads": 32, "kv_heads": 8, "d": 128, "block_size": 16, "dtype": torch.bfloat16}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_llama3_8b_shapes_on_the_gpu():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randint(1000, 4097, (8,), generator=gen).tolist()
    dec = paged_case(gen, [*ctx, 0], [1] * 9, **LLAMA3_8B)
    want = dec.ref()
    for splits in (None, 1):
        assert_matches(dec.decode(num_splits=splits), want, torch.bfloat16, seed)
    for window in (None, 1000):
        assert_matches(dec.decode(window), dec.ref(window), torch.bfloat16, seed)
    q_lens, ctx = [512, 512, 300, 1], [512, 3000, 1500, 2000]  # a prompt, chunks, a decode
    pre = paged_case(gen, ctx, q_lens, **LLAMA3_8B)
    assert_matches(pre.prefill(), pre.ref(), torch.bfloat16, seed)
    assert_matches(pre.prefill(1000), pre.ref(1000), torch.bfloat16, seed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_replays_from_a_cuda_graph_with_new_tables_and_lengths():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    c = paged_case(gen, [1500, 700, 3000, 20], [1] * 4, **LLAMA3_8B)
    out = torch.empty_like(c.q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        c.decode(out=out)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        c.decode(out=out)
    tables = c.block_tables.clone()
    # Rolled tables hand each row another sequence's blocks; each length fits what it owns.
    for shift, lens in ((0, [1500, 700, 3000, 20]), (1, [20, 1499, 0, 2500]), (2, [0] * 4)):
        c.block_tables.copy_(tables.roll(shift, dims=0))
        c.context_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        assert_matches(out, c.ref(), torch.bfloat16, seed)
