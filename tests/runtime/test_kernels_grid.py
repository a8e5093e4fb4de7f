"""The persistent grid: any number of programs covers every live work item exactly once, and
the number launched is bounded by the device, not by the batch's shape bound."""

from __future__ import annotations

import importlib
import random

import pytest
import torch
import triton
from runtime_helpers import LLAMA3_8B
from runtime_helpers import LLAMA3_8B_SHRINKS as SHRINKS
from test_kernels import DEVICE, TOL, fresh_seed, rel_err

from loraplane.runtime.kernels import lora_expand, lora_shrink, segment_tiles, segments
from loraplane.runtime.kernels.lora_expand import BLOCK_N, EXPAND_CONFIGS, expand_programs
from loraplane.runtime.kernels.lora_shrink import (
    BLOCK_R,
    SHRINK_CONFIGS,
    choose_split_k,
    lora_shrink_ref,
    rank_mask,
    shrink_programs,
)
from loraplane.runtime.kernels.segments import LaunchConfig
from loraplane.runtime.lora.batch import choose_block_m

# The package re-exports the launchers under the modules' names.
shrink_module = importlib.import_module("loraplane.runtime.kernels.lora_shrink")
expand_module = importlib.import_module("loraplane.runtime.kernels.lora_expand")
MIXES = ("one-token-per-slot", "one-slot-all-tokens", "some-none", "rank-0-slots")
EVERY_ITEM = 10**6  # programs_per_sm so large that each work item gets its own program


def programs(n: int) -> LaunchConfig:
    # Off the GPU a device counts one SM (segments.sm_count): n programs, fewer if less work.
    return LaunchConfig(num_warps=4, num_stages=2, programs_per_sm=n)


def draw(mix: str, seed: int) -> dict:
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    num_slots, r_max = rng.randint(3, 9), rng.choice([8, 16, 40])
    ranks = torch.full((num_slots,), r_max, dtype=torch.int32)
    if mix == "one-token-per-slot":
        num_slots = rng.randint(17, 33)
        ranks = torch.randint(1, r_max + 1, (num_slots,), generator=gen, dtype=torch.int32)
        slots = torch.randperm(num_slots, generator=gen)
    elif mix == "one-slot-all-tokens":
        slots = torch.full((rng.randint(40, 100),), rng.randrange(num_slots))
    elif mix == "some-none":
        slots = torch.randint(-1, num_slots, (rng.randint(10, 60),), generator=gen)
    else:
        ranks = torch.randint(0, r_max + 1, (num_slots,), generator=gen, dtype=torch.int32)
        ranks[rng.randrange(num_slots)] = 0
        slots = torch.randint(-1, num_slots, (rng.randint(10, 60),), generator=gen)
    return {
        "num_slots": num_slots,
        "r_max": r_max,
        "ranks": ranks.to(DEVICE),
        "slots": slots.to(torch.int32).to(DEVICE),
        "block_m": rng.choice([4, 16]),
        "d_in": rng.choice([40, 200]),
        "d_out": rng.choice([24, 130]),
        "split_k": rng.randint(1, 2),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", MIXES)
def test_any_number_of_programs_gives_the_same_bits(mix, dtype):
    """Each item computes the same thing whichever program runs it: 1, 3 or 7 programs must
    match one program per item bit for bit (a skipped item leaves NaN, a repeated one adds
    twice into y), and all of them the float64 reference."""
    seed = fresh_seed()
    c = draw(mix, seed)
    ctx = f"seed={seed} mix={mix} dtype={dtype}"
    gen = torch.Generator().manual_seed(seed)
    s, r, t = c["num_slots"], c["r_max"], len(c["slots"])
    x = torch.randn(t, c["d_in"], generator=gen).to(dtype).to(DEVICE)
    a = (torch.randn(s, r, c["d_in"], generator=gen) / c["d_in"] ** 0.5).to(dtype).to(DEVICE)
    b = torch.randn(s, c["d_out"], r, generator=gen).to(dtype).to(DEVICE)
    y0 = torch.randn(t, c["d_out"], generator=gen).to(dtype).to(DEVICE)
    scales = (torch.rand(s, generator=gen) * 2).to(DEVICE)
    ranks, slots = c["ranks"], c["slots"]
    tiles = segment_tiles(slots, s, c["block_m"])

    def run(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.full((c["split_k"], t, r), float("nan"), device=DEVICE)
        lora_shrink(x, a, ranks, tiles, split_k=c["split_k"], out=h, config=programs(n))
        y = lora_expand(y0.clone(), h, b, ranks, scales, tiles, block_n=64, config=programs(n))
        return h, y

    h_all, y_all = run(EVERY_ITEM)
    for n in (1, 3, 7):
        h, y = run(n)
        assert torch.equal(h.nan_to_num(-7.0), h_all.nan_to_num(-7.0)), f"{n} programs; {ctx}"
        assert torch.equal(y, y_all), f"{n} programs; {ctx}"
    live = rank_mask(ranks, slots, r)
    assert not h_all.sum(0)[live].isnan().any(), f"an item was never run; {ctx}"
    h_ref = lora_shrink_ref(x.double(), a.double(), ranks, slots)
    if live.any():
        err = rel_err(h_all.sum(0)[live], h_ref[live])
        assert err < TOL[dtype], f"shrink relative error {err:.2e}; {ctx}"
    untouched = ~live.any(1)
    assert torch.equal(y_all[untouched], y0[untouched]), ctx


@pytest.mark.parametrize("n", [1, 3, 7, EVERY_ITEM])
@pytest.mark.parametrize("mix", MIXES)
def test_expand_adds_each_item_exactly_once(mix, n):
    """With h and B all ones, every (token, column) of y gets splits * rank * scale, an exact
    integer in fp32: an item run twice would double it, an item skipped would leave 0."""
    seed = fresh_seed()
    c = draw(mix, seed)
    s, r, t, d_out, splits = c["num_slots"], c["r_max"], len(c["slots"]), c["d_out"], c["split_k"]
    ranks, slots = c["ranks"], c["slots"]
    tiles = segment_tiles(slots, s, c["block_m"])
    h = torch.ones(splits, t, r, device=DEVICE)
    b = torch.ones(s, d_out, r, device=DEVICE)
    scales = torch.arange(1, s + 1, dtype=torch.float32, device=DEVICE)
    y = torch.zeros(t, d_out, device=DEVICE)
    lora_expand(y, h, b, ranks, scales, tiles, block_n=32, config=programs(n))
    index = slots.clamp(min=0).long()
    per_token = torch.where(slots >= 0, splits * ranks[index] * scales[index], 0.0)
    want = per_token[:, None].expand(t, d_out)
    times = (y / want.clamp(min=1)).round()  # how often each cell's item ran
    assert torch.equal(y, want), (
        f"{int((times == 0)[want > 0].sum())} cells never added, {int((times > 1).sum())} added "
        f"more than once, {int((y != 0)[want == 0].sum())} changed without an adapter; "
        f"seed={seed} mix={mix} n={n}"
    )


@pytest.mark.parametrize("n", [1, 5, EVERY_ITEM])
def test_grouped_shrink_in_a_persistent_grid(n):
    """q/k/v stacked in one A with rank-0 members: live and dead rank tiles interleave."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    members, num_slots, r_max, rows, d_in, t = 3, 6, 20, 32, 72, 40
    a = torch.full((num_slots, members * rows, d_in), float("nan"))  # padding is never read
    for m in range(members):
        a[:, m * rows : m * rows + r_max] = torch.randn(num_slots, r_max, d_in, generator=gen)
    a = a.to(DEVICE)
    ranks = torch.randint(0, r_max + 1, (members, num_slots), generator=gen, dtype=torch.int32)
    ranks[1, :3] = 0  # a member that some adapters do not target
    ranks = ranks.to(DEVICE)
    token_slots = torch.randint(-1, num_slots, (t,), generator=gen).to(torch.int32).to(DEVICE)
    x = torch.randn(t, d_in, generator=gen).to(DEVICE)
    tiles = segment_tiles(token_slots, num_slots, 4)
    h = torch.full((2, t, members * rows), float("nan"), device=DEVICE)
    lora_shrink(x, a, ranks, tiles, split_k=2, out=h, config=programs(n))
    for m in range(members):
        cols = slice(m * rows, m * rows + r_max)
        want = lora_shrink_ref(x.double(), a[:, cols].double(), ranks[m], token_slots)
        live = rank_mask(ranks[m], token_slots, r_max)
        if live.any():
            err = rel_err(h[:, :, cols].sum(0)[live], want[live])
            assert err < TOL[torch.float32], f"member {m}, {n} programs: {err:.2e}; seed={seed}"


class GridRecorder:
    """Stands in for a @triton.jit kernel: records each launch's grid, then launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_launchers_launch_the_grid_their_functions_report(monkeypatch):
    shrink = GridRecorder(shrink_module._lora_shrink_kernel)
    expand = GridRecorder(expand_module._lora_expand_kernel)
    monkeypatch.setattr(shrink_module, "_lora_shrink_kernel", shrink)
    monkeypatch.setattr(expand_module, "_lora_expand_kernel", expand)
    slots = torch.arange(60, dtype=torch.int32) % 30
    tiles = segment_tiles(slots, 30, 16)
    x, a = torch.randn(60, 256), torch.randn(30, 48, 256)
    ranks = torch.full((30,), 40, dtype=torch.int32)
    h = lora_shrink(x, a, ranks, tiles)
    lora_expand(torch.zeros(60, 300), h, torch.randn(30, 300, 48), ranks, torch.ones(30), tiles)
    cpu = torch.device("cpu")
    shrink_config, expand_config = (
        SHRINK_CONFIGS[("decode", x.dtype)],
        EXPAND_CONFIGS[("decode", x.dtype)],
    )
    split_k = choose_split_k(tiles, 256, 48)
    want_shrink = shrink_programs(tiles, 48, split_k, cpu, shrink_config)
    want_expand = expand_programs(tiles, 300, BLOCK_N["decode"], cpu, expand_config)
    assert shrink.grids == [(want_shrink,)] and expand.grids == [(want_expand,)]
    # The bounds (102 items each) exceed the cap: the config's programs on the one CPU "SM".
    assert (want_shrink, want_expand) == (
        shrink_config.programs_per_sm,
        expand_config.programs_per_sm,
    )


# Llama-3-8B's layers (its LoRA sites and shrinks: runtime_helpers), and an H200's SMs.
LAYERS, H200_SMS = 32, 132


def decode_step_ctas(tokens: int, num_slots: int, max_rank: int) -> tuple[int, int]:
    """CTAs one decode step launches, (before: one per bounded item, now), on an H200."""
    block_m = choose_block_m(tokens, num_slots)
    tiles = segment_tiles(torch.zeros(tokens, dtype=torch.int32), num_slots, block_m)
    cuda = torch.device("cuda", 0)
    group_rows = triton.cdiv(max_rank, BLOCK_R) * BLOCK_R
    before = now = 0
    for group in SHRINKS:
        rows = max_rank if len(group) == 1 else len(group) * group_rows
        d_in = LLAMA3_8B[group[0]][0]
        split_k = choose_split_k(tiles, d_in, rows)
        before += tiles.max_tiles * triton.cdiv(rows, BLOCK_R) * split_k
        now += shrink_programs(
            tiles, rows, split_k, cuda, SHRINK_CONFIGS[("decode", torch.bfloat16)]
        )
    for _, d_out in LLAMA3_8B.values():
        before += tiles.max_tiles * triton.cdiv(d_out, BLOCK_N["decode"])
        now += expand_programs(
            tiles, d_out, BLOCK_N["decode"], cuda, EXPAND_CONFIGS[("decode", torch.bfloat16)]
        )
    return before * LAYERS, now * LAYERS


def test_decode_step_ctas_are_bounded_by_the_gpu_not_the_batch(monkeypatch):
    monkeypatch.setattr(segments, "_cuda_sm_count", lambda index: H200_SMS)
    before, now = decode_step_ctas(tokens=64, num_slots=64, max_rank=16)
    # One CTA per bounded item, with today's tiles (852,992 with the first ones: BLOCK_N 128,
    # 8 splits), most of them idle for one adapter: the cost this grid removes.
    assert before == 487_424
    shrink_per_sm = SHRINK_CONFIGS[("decode", torch.bfloat16)].programs_per_sm  # 3
    expand_per_sm = EXPAND_CONFIGS[("decode", torch.bfloat16)].programs_per_sm  # 2
    cap = LAYERS * (len(SHRINKS) * shrink_per_sm + len(LLAMA3_8B) * expand_per_sm) * H200_SMS
    assert now == cap == 109_824
    # More slots, higher ranks, more tokens grow the bound, not the launch.
    for tokens, num_slots, max_rank in ((64, 256, 64), (256, 256, 16), (512, 64, 128)):
        more_before, more_now = decode_step_ctas(tokens, num_slots, max_rank)
        assert more_before > before and more_now <= cap, (tokens, num_slots, max_rank)


def test_segment_tiles_count_and_pack_the_live_tiles():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    for block_m in (1, 4, 16):
        slots = torch.randint(
            -1, 7, (int(torch.randint(0, 60, (1,), generator=gen)),), generator=gen
        )
        tiles = segment_tiles(slots, 7, block_m)
        want = int(((tiles.counts + block_m - 1) // block_m).sum())
        assert tiles.num_live_tiles.tolist() == [want], f"seed={seed} block_m={block_m}"
        assert (tiles.tile_slot[:want] >= 0).all() and (tiles.tile_slot[want:] == -1).all()
