"""Shrink/expand kernels against a float64 torch reference, on fresh random shapes and mixes.

On a CPU-only machine the kernels run under the Triton interpreter (see conftest.py). Every
run draws new inputs; the seed is in every failure message so a failure can be replayed
with LORAPLANE_TEST_SEED=<seed>.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from loraplane.runtime.kernels import (
    lora_expand,
    lora_expand_ref,
    lora_shrink,
    lora_shrink_ref,
    segment_tiles,
)
from loraplane.runtime.kernels.lora_shrink import rank_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
if DEVICE == "cpu":
    # The interpreter converts fp32 to bf16 by truncation, not round-to-nearest: up to one
    # bf16 ulp (2^-7) per rounding, and the expand rounds twice (h, then y). GPUs round.
    TOL[torch.bfloat16] = 2e-2
MIXES = ("distinct", "identical", "skewed", "some-none", "all-none", "mixed-ranks", "prefill")


def fresh_seed() -> int:
    return int(os.environ.get("LORAPLANE_TEST_SEED") or random.SystemRandom().randrange(2**31))


def draw_case(mix: str, gen: torch.Generator, rng: random.Random) -> dict:
    num_slots = rng.randint(2, 9)
    r_max = rng.choice([8, 16, 24, 40])
    num_tokens = rng.randint(1, num_slots) if mix == "distinct" else rng.randint(2, 48)
    if mix == "prefill":
        num_tokens = rng.randint(70, 160)
    ranks = torch.full((num_slots,), r_max, dtype=torch.int32)
    if mix in ("mixed-ranks", "prefill", "some-none"):
        ranks = torch.randint(0, r_max + 1, (num_slots,), generator=gen, dtype=torch.int32)
    if mix == "distinct":
        slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    elif mix == "identical":
        slots = torch.full((num_tokens,), rng.randrange(num_slots))
    elif mix == "skewed":
        slots = torch.randint(0, num_slots, (num_tokens,), generator=gen)
        slots[torch.rand(num_tokens, generator=gen) < 0.8] = rng.randrange(num_slots)
    elif mix == "all-none":
        slots = torch.full((num_tokens,), -1)
    else:
        slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen)
    return {
        "num_slots": num_slots,
        "r_max": r_max,
        "d_in": rng.choice([16, 40, 96, 200]),
        "d_out": rng.choice([24, 64, 130]),
        "ranks": ranks,
        "slots": slots,
        "block_m": 64 if mix == "prefill" else rng.choice([16, 64]),
        "split_k": rng.randint(1, 3),
    }


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not got.isnan().any(), "NaN in the kernel output"
    return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mix", MIXES)
def test_shrink_expand_match_float64_reference(mix, dtype):
    seed = fresh_seed()
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    c = draw_case(mix, gen, rng)
    ctx = f"seed={seed} mix={mix} dtype={dtype} case={ {k: v for k, v in c.items() if k not in ('slots', 'ranks')} }"
    s, r, d_in, d_out, t = c["num_slots"], c["r_max"], c["d_in"], c["d_out"], len(c["slots"])
    x = torch.randn(t, d_in, generator=gen).to(dtype)
    a = (torch.randn(s, r, d_in, generator=gen) / d_in**0.5).to(dtype)
    b = torch.randn(s, d_out, r, generator=gen).to(dtype)
    y0 = torch.randn(t, d_out, generator=gen).to(dtype)
    scales = torch.rand(s, generator=gen) * 2
    x, a, b, y0, scales = (v.to(DEVICE) for v in (x, a, b, y0, scales))
    ranks, slots = c["ranks"].to(DEVICE), c["slots"].to(DEVICE)
    tiles = segment_tiles(slots.to(torch.int32), s, c["block_m"])

    # Poisoned outputs: whatever the kernels leave unwritten, or read beyond a rank, is NaN.
    h = torch.full((c["split_k"], t, r), float("nan"), device=DEVICE)
    lora_shrink(x, a, ranks, tiles, split_k=c["split_k"], out=h)
    h_ref = lora_shrink_ref(x.double(), a.double(), ranks, slots)
    live = rank_mask(ranks, slots, r)
    if live.any():
        err = rel_err(h.sum(0)[live], h_ref[live])
        assert err < TOL[dtype], f"shrink relative error {err:.2e}; {ctx}"

    y = y0.clone()
    lora_expand(y, h, b, ranks, scales, tiles)
    y_ref = lora_expand_ref(y0.double(), h_ref, b.double(), ranks, scales.double(), slots)
    err = rel_err(y, y_ref)
    assert err < TOL[dtype], f"expand relative error {err:.2e}; {ctx}"
    # Tokens without an adapter, or whose adapter skips this module, are left bit-identical.
    untouched = ~live.any(1)
    assert torch.equal(y[untouched], y0[untouched]), ctx


def test_segment_tiles_cover_each_adapter_token_once():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    for block_m in (1, 4, 16):
        slots = torch.randint(
            -1, 7, (int(torch.randint(1, 60, (1,), generator=gen)),), generator=gen
        )
        tiles = segment_tiles(slots, 7, block_m)
        seen = []
        for slot, start, end in zip(
            tiles.tile_slot.tolist(),
            tiles.tile_start.tolist(),
            tiles.tile_end.tolist(),
            strict=True,
        ):
            if slot < 0:
                continue
            rows = tiles.sorted_tokens[start : min(start + block_m, end)].tolist()
            assert rows and all(slots[i] == slot for i in rows), f"seed={seed}"
            seen += rows
        want = sorted(i for i, s in enumerate(slots.tolist()) if s >= 0)
        assert sorted(seen) == want, f"seed={seed} block_m={block_m}"
        expected = torch.bincount(slots[slots >= 0], minlength=7)
        assert torch.equal(tiles.counts, expected), f"seed={seed}"


def test_launchers_reject_mismatched_inputs():
    x = torch.zeros(4, 32)
    a = torch.zeros(3, 16, 32, dtype=torch.float16)
    tiles = segment_tiles(torch.zeros(4, dtype=torch.int32), 3, 16)
    with pytest.raises(AssertionError):
        lora_shrink(x, a, torch.zeros(3, dtype=torch.int32), tiles)  # dtype mismatch
    with pytest.raises(AssertionError):
        lora_shrink(x, a.float(), torch.zeros(3, dtype=torch.int64), tiles)  # ranks dtype
    with pytest.raises(AssertionError):
        lora_shrink(x[:3], a.float(), torch.zeros(3, dtype=torch.int32), tiles)  # token count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_shrink_matches_each_member(dtype):
    """q/k/v-style members stacked in one A, each with its own rank per slot, in one launch."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    members, slots, r_max, rows, d_in, t = 3, 5, 12, 16, 72, 30
    a = torch.full((slots, members * rows, d_in), float("nan"))  # padding rows are never read
    for m in range(members):
        a[:, m * rows : m * rows + r_max] = torch.randn(slots, r_max, d_in, generator=gen)
    a = a.to(dtype).to(DEVICE)
    ranks = torch.randint(0, r_max + 1, (members, slots), generator=gen, dtype=torch.int32)
    ranks = ranks.to(DEVICE)
    token_slots = torch.randint(-1, slots, (t,), generator=gen).to(DEVICE)
    x = torch.randn(t, d_in, generator=gen).to(dtype).to(DEVICE)
    tiles = segment_tiles(token_slots.to(torch.int32), slots, 16)
    h = torch.full((2, t, members * rows), float("nan"), device=DEVICE)
    lora_shrink(x, a, ranks, tiles, split_k=2, out=h)
    for m in range(members):
        cols = slice(m * rows, m * rows + r_max)
        want = lora_shrink_ref(x.double(), a[:, cols].double(), ranks[m], token_slots)
        live = rank_mask(ranks[m], token_slots, r_max)
        if live.any():
            err = rel_err(h[:, :, cols].sum(0)[live], want[live])
            assert err < TOL[dtype], f"member {m}: relative error {err:.2e}; seed={seed}"
