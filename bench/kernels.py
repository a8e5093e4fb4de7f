"""Shrink+expand for one LoRA site with N distinct adapters: check on the device, then time.

python bench/kernels.py                 # GPU: 4096x4096 site, B=64, N=1/8/32/64, r=8/16/64
python bench/kernels.py --cpu --tiny    # proves the script on a CPU (Triton interpreter)
"""

from __future__ import annotations

import argparse
import datetime

SIZES = {
    "full": {"d_in": 4096, "d_out": 4096, "tokens": 64, "ns": (1, 8, 32, 64), "ranks": (8, 16, 64)},
    "tiny": {"d_in": 128, "d_out": 96, "tokens": 8, "ns": (1, 4, 8), "ranks": (8, 16)},
}
REPS = 20  # launches per CUDA graph replay: the kernels take microseconds, launches more


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (seconds on a CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed repetitions (median)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    from device import choose_device

    device, dtype, gpu = choose_device(args.cpu)
    import torch

    from loraplane.runtime.lora.batch import choose_block_m

    size = SIZES["tiny" if args.tiny else "full"]
    iters = args.iters or (3 if args.cpu else 50)
    slots = max(size["ns"])
    print(f"# bench/kernels.py  {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"# device: {gpu}  torch {torch.__version__}  dtype {dtype}  size {size}")
    if args.cpu:
        print("# CPU + Triton interpreter: proves the script runs; the times mean nothing")

    ok = check(size, slots, dtype, device)
    table(size, slots, dtype, device, iters, choose_block_m)
    for live in (slots, 1):
        sweep(size, slots, live, dtype, device, iters, choose_block_m)
    return 0 if ok else 1


def site(d_in, d_out, slots, r_max, rank, dtype, device, gen):
    import torch

    a = (torch.randn(slots, r_max, d_in, generator=gen) * d_in**-0.5).to(dtype).to(device)
    b = (torch.randn(slots, d_out, r_max, generator=gen) * r_max**-0.5).to(dtype).to(device)
    ranks = torch.full((slots,), rank, dtype=torch.int32, device=device)
    scales = torch.full((slots,), 2.0, device=device)
    return a, b, ranks, scales


def token_slots(tokens: int, n: int, device):
    import torch

    # N distinct adapters share the batch evenly: sequence i uses adapter i mod N.
    return (torch.arange(tokens, device=device) % n).to(torch.int32)


def check(size, slots, dtype, device) -> bool:
    import torch

    from loraplane.runtime.kernels import (
        lora_expand,
        lora_expand_ref,
        lora_shrink,
        lora_shrink_ref,
        segment_tiles,
    )

    gen = torch.Generator().manual_seed(0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    ok = True
    for n, rank, r_max in [(slots, 16, 16), (1, 64, 64), (slots // 2 or 1, 8, 64)]:
        a, b, ranks, scales = site(
            size["d_in"], size["d_out"], slots, r_max, rank, dtype, device, gen
        )
        ts = token_slots(size["tokens"], n, device)
        ts[::5] = -1  # some tokens without adapter
        x = torch.randn(size["tokens"], size["d_in"], generator=gen).to(dtype).to(device)
        y0 = torch.randn(size["tokens"], size["d_out"], generator=gen).to(dtype).to(device)
        tiles = segment_tiles(ts, slots, 16)
        y = lora_expand(y0.clone(), lora_shrink(x, a, ranks, tiles), b, ranks, scales, tiles)
        h = lora_shrink_ref(x.double(), a.double(), ranks, ts)
        ref = lora_expand_ref(y0.double(), h, b.double(), ranks, scales.double(), ts)
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        good = err < tol and not y.isnan().any()
        ok &= good
        print(
            f"check N={n:<3} rank={rank:<3} r_max={r_max:<3} rel.err {err:.1e}  {'ok' if good else 'WRONG'}"
        )
    return ok


def table(size, slots, dtype, device, iters, choose_block_m) -> None:
    import torch
    import torch.nn.functional as F

    from loraplane.runtime.kernels import lora_expand, lora_shrink, segment_tiles
    from timing import capture, median_ms

    gen = torch.Generator().manual_seed(1)
    d_in, d_out, tokens = size["d_in"], size["d_out"], size["tokens"]
    reps = 1 if device.type == "cpu" else REPS
    x = torch.randn(tokens, d_in, generator=gen).to(dtype).to(device)
    w = (torch.randn(d_out, d_in, generator=gen) * d_in**-0.5).to(dtype).to(device)
    y = torch.zeros(tokens, d_out, dtype=dtype, device=device)

    def repeat(fn):
        def run():
            for _ in range(reps):
                fn()

        return run

    base_us = median_ms(capture(repeat(lambda: F.linear(x, w)), device), device, iters)
    base_us *= 1e3 / reps
    print(f"\nbase GEMM [{tokens}x{d_in}]·[{d_in}x{d_out}]: {base_us:.1f} us")
    print(
        f"{'rank':>4} {'r_max':>5} {'N':>4} {'lora us':>9} {'GB/s':>7} {'lora/base':>9} {'bytes+':>7}"
    )

    def row(label_n, n, rank, r_max, slots_of_tokens):
        a, b, ranks, scales = site(d_in, d_out, slots, r_max, rank, dtype, device, gen)
        tiles = segment_tiles(slots_of_tokens, slots, choose_block_m(tokens, slots))

        def step():
            lora_expand(y, lora_shrink(x, a, ranks, tiles), b, ranks, scales, tiles)

        us = median_ms(capture(repeat(step), device), device, iters) * 1e3 / reps
        moved = n * rank * (d_in + d_out) * a.element_size() + tokens * (d_in + 2 * d_out) * 2
        ideal = n * rank * (d_in + d_out) / (d_in * d_out)
        print(
            f"{rank:>4} {r_max:>5} {label_n:>4} {us:>9.1f} {moved / us / 1e3:>7.0f} "
            f"{us / base_us:>9.3f} {ideal:>7.3f}"
        )

    for rank in size["ranks"]:
        for n in size["ns"]:
            row(n, n, rank, rank, token_slots(tokens, n, device))
    # Only the true rank costs: rank-16 adapters in rank-64 buffers.
    row(slots, slots, 16, 64, token_slots(tokens, slots, device))
    # No token has an adapter: every program exits at once.
    row("none", 0, 16, 16, torch.full((tokens,), -1, dtype=torch.int32, device=device))


def sweep(size, slots, live, dtype, device, iters, choose_block_m) -> None:
    """Each kernel alone over its tile choices at decode, `live` of `slots` adapters in use:
    all distinct (the most work) and one shared (the fixed cost a batch pays for LoRA)."""
    import torch

    from loraplane.runtime.kernels import lora_expand, lora_shrink, segment_tiles
    from loraplane.runtime.kernels.lora_expand import BLOCK_N
    from loraplane.runtime.kernels.lora_shrink import BLOCK_K, choose_split_k
    from timing import capture, median_ms

    tiny = device.type == "cpu"
    reps = 1 if tiny else REPS
    gen = torch.Generator().manual_seed(2)
    d_in, d_out, tokens = size["d_in"], size["d_out"], size["tokens"]
    a, b, ranks, scales = site(d_in, d_out, slots, 16, 16, dtype, device, gen)
    x = torch.randn(tokens, d_in, generator=gen).to(dtype).to(device)
    y = torch.zeros(tokens, d_out, dtype=dtype, device=device)
    tiles = segment_tiles(token_slots(tokens, live, device), slots, choose_block_m(tokens, slots))
    h = lora_shrink(x, a, ranks, tiles)

    def us(fn) -> float:
        def run():
            for _ in range(reps):
                fn()

        return median_ms(capture(run, device), device, iters) * 1e3 / reps

    default_split = choose_split_k(tiles, d_in, 16)
    print(f"\ntile sweep, N={live} of {slots} slots, rank 16, {tokens} tokens (* = the default)")
    for split in (1, 2) if tiny else (1, 2, 4, 8, 16):
        cells = []
        for bk in (64, 128) if tiny else (64, 128, 256):
            t = us(lambda s=split, k=bk: lora_shrink(x, a, ranks, tiles, split_k=s, block_k=k))
            mark = "*" if (split, bk) == (default_split, BLOCK_K) else " "
            cells.append(f"BLOCK_K={bk:<3} {t:8.1f} us{mark}")
        print(f"  shrink split_k={split:<2} " + "   ".join(cells))
    cells = []
    for bn in (64, 128) if tiny else (32, 64, 128, 256):
        t = us(lambda n=bn: lora_expand(y, h, b, ranks, scales, tiles, block_n=n))
        mark = "*" if bn == BLOCK_N[tiles.phase] else " "
        cells.append(f"BLOCK_N={bn:<3} {t:8.1f} us{mark}")
    print("  expand             " + "   ".join(cells))


if __name__ == "__main__":
    raise SystemExit(main())
