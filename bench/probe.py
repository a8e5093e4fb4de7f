"""The first step of a GPU run: what the machine is, and the costs every other number rests on.

Prints, in one run: versions (against our pins) and where each package came from; the GPU,
its driver and free memory; the two ceilings (device copy GB/s, bf16 matmul TFLOP/s); which
SDPA kernel torch picks at the decode benchmark's attention shapes and what each costs; host
µs per kernel launch (an almost empty Triton kernel, a tiny torch op), eager and in a CUDA
graph; and Llama-3-8B-shaped linear layers alone and inside our LoraLinear (8 slots, rank 16).

    python bench/probe.py          # GPU, about 30 s
    python bench/probe.py --cpu    # tiny shapes on the CPU, Triton interpreter: seconds
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = [
    "torch",
    "triton",
    "transformers",
    "peft",
    "tokenizers",
    "safetensors",
    "huggingface-hub",
    "accelerate",
    "numpy",
    "pydantic",
    "pydantic-core",
    "fastapi",
    "starlette",
    "uvicorn",
    "sse-starlette",
    "httpx",
    "anyio",
    "typing-extensions",
    "prometheus-client",
    "pytest",
    "pytest-asyncio",
    "pytest-timeout",
]
# (site, d_in, d_out) at Llama-3-8B (4096 hidden, 14336 MLP, 8 KV heads of 128) and tiny.
SITES = {
    "full": [
        ("q/o", 4096, 4096),
        ("k/v", 4096, 1024),
        ("gate/up", 4096, 14336),
        ("down", 14336, 4096),
    ],
    "tiny": [("q/o", 128, 128), ("k/v", 128, 32), ("gate/up", 128, 448), ("down", 448, 128)],
}
SLOTS, RANK = 8, 16
REPS = 20  # calls per timed sample: a linear at 64 tokens takes microseconds


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    p.add_argument("--iters", type=int, help="timed samples per number (median; default 20, cpu 3)")
    args = p.parse_args()
    args.iters = args.iters or (3 if args.cpu else 20)
    return args


def main() -> int:
    args = parse_args()
    from device import choose_device

    device, dtype, name = choose_device(args.cpu)
    from sdpa import one_line

    print(f"# bench/probe.py  {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC  {name}")
    if args.cpu:
        print("# CPU + Triton interpreter: proves the script runs; the times mean nothing")
    versions()
    machine(device)
    ok = True
    for section in (ceilings, attention, launches, linears):
        start = time.perf_counter()
        try:
            section(device, dtype, args.iters)
        except Exception as err:  # one broken section must not hide the others' numbers
            ok = False
            print(f"!! {section.__name__} failed: {type(err).__name__}: {one_line(str(err))}")
        print(f"# ({section.__name__}: {time.perf_counter() - start:.1f} s)")
    return 0 if ok else 1


def pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [
        r for deps in project["optional-dependencies"].values() for r in deps
    ]
    found = (re.match(r"([A-Za-z0-9_.-]+)==([^;\s]+)", r) for r in reqs)
    return {norm(m[1]): m[2] for m in found if m}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def versions() -> None:
    print(f"\n## software\npython {platform.python_version()} ({sys.executable})")
    pinned = pins()
    for pkg in PACKAGES:
        try:
            dist = importlib.metadata.distribution(pkg)
        except importlib.metadata.PackageNotFoundError:
            print(f"  {pkg:<18} MISSING (pinned {pinned.get(norm(pkg), '-')})")
            continue
        pin = pinned.get(norm(pkg))
        drift = "" if pin is None or dist.version.split("+")[0] == pin else f" (pinned {pin})"
        where = str(dist.locate_file("")).rstrip("/")  # the site dir: image or carried
        print(f"  {pkg:<18} {dist.version + drift:<28} {where}")
    import loraplane

    print(f"  loraplane from {os.path.dirname(loraplane.__file__)}")


def machine(device) -> None:
    import torch

    print("\n## machine")
    print(
        f"host: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"torch {torch.__version__}  CUDA {torch.version.cuda}  cuDNN {torch.backends.cudnn.version()}"
    )
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")
    if device.type != "cuda":
        return
    p = torch.cuda.get_device_properties(device)
    free, total = torch.cuda.mem_get_info(device)
    l2 = getattr(p, "L2_cache_size", 0) / 2**20
    print(
        f"GPU: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, L2 {l2:.0f} MiB, "
        f"{total / 2**30:.1f} GiB, free {free / 2**30:.1f} GiB"
    )
    query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu"
    for cmd in (
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv"],
    ):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired) as err:
            out = f"{cmd[0]}: {err}"
        print(out.strip())


def per_call_us(fn, device, iters: int, graph: bool, reps: int = REPS) -> float:
    """Median µs of one fn() call, over samples of `reps` calls (replayed as a graph if asked)."""
    from timing import capture, median_ms

    reps = reps if device.type == "cuda" else 1  # the interpreter: one call is plenty

    def run():
        for _ in range(reps):
            fn()

    return median_ms(capture(run, device) if graph else run, device, iters) * 1e3 / reps


def ceilings(device, dtype, iters: int) -> None:
    """METHOD.md's two numbers: bytes/s of a device copy and the matmul rate, on random data."""
    import torch

    n, m = (1 << 28, 8192) if device.type == "cuda" else (1 << 20, 256)
    src = torch.randn(n, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    us = per_call_us(lambda: dst.copy_(src), device, iters, graph=False, reps=3)
    a, b = (torch.randn(m, m, device=device, dtype=dtype) for _ in range(2))
    mm_us = per_call_us(lambda: a @ b, device, iters, graph=False, reps=3)
    print(f"\n## ceilings ({dtype})")
    print(
        f"device copy {2 * src.nbytes / 2**20:.0f} MiB moved: {2 * src.nbytes / us / 1e3:.0f} GB/s"
    )
    print(f"matmul {m}x{m}x{m}: {2 * m**3 / mm_us / 1e6:.1f} TFLOP/s")


def attention(device, dtype, iters: int) -> None:
    """bench/decode.py's attention: one query per sequence over a full cache, GQA."""
    import torch

    from sdpa import each_backend, picked, picked_in

    b, h, kv, hd, keys = (64, 32, 8, 128, 129) if device.type == "cuda" else (4, 4, 2, 16, 9)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, h, 1, hd, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(b, kv, keys, hd, device=device, dtype=dtype, generator=gen) for _ in "kv")
    mask = torch.ones(b, 1, 1, keys, dtype=torch.bool, device=device)
    print(
        f"\n## attention (SDPA), q [{b},{h},1,{hd}], k/v [{b},{kv},{keys},{hd}], {dtype}, enable_gqa"
    )

    def time_ms(fn) -> float:
        return per_call_us(fn, device, iters, graph=True) / 1e3

    for case, extra in (
        ("no mask (the timed decode step)", {}),
        ("bool mask [B,1,1,T]", {"attn_mask": mask}),
    ):
        kwargs = {"enable_gqa": True, **extra}
        with torch.inference_mode():
            chosen = picked(q, k, v, **kwargs)
            ran = picked_in(
                lambda kw=kwargs: torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
            )
            print(f"{case}: torch picks {chosen}, ran {ran}")
            for backend, result in each_backend(q, k, v, time_ms, **kwargs).items():
                print(f"    {backend:<10} {result}")


def launches(device, dtype, iters: int) -> None:
    """Host µs per launch: an almost empty Triton kernel and a one-element torch op."""
    import torch

    from touch import touch

    x = torch.zeros(1, device=device)
    n = 2000 if device.type == "cuda" else 20
    print(f"\n## launch cost, us per launch (host loop of {n}, then a synchronize)")
    ops = {
        "triton kernel (one store)": lambda: touch(x),
        "torch x.add_(1), 1 element": lambda: x.add_(1),
    }
    for what, fn in ops.items():
        fn()  # compile
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        host = (time.perf_counter() - t0) / n * 1e6
        graph = "n/a on a CPU"
        if device.type == "cuda":
            graph = f"{per_call_us(fn, device, iters, graph=True, reps=200):.2f}"
        print(f"{what:<28} eager {host:8.2f}   in a CUDA graph {graph}")


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def linears(device, dtype, iters: int) -> None:
    """Each Llama-3-8B site's Linear alone, then inside our LoraLinear: throughput ratios."""
    import torch

    sites = SITES["full" if device.type == "cuda" else "tiny"]
    layers, bank = lora_sites(sites, device, dtype)
    modes = ("graph", "eager") if device.type == "cuda" else ("eager",)
    print(
        f"\n## linear layers, {dtype}: plain nn.Linear vs our LoraLinear ({SLOTS} slots, rank "
        f"{RANK})\n#  us per call, (x) = plain / this: 'off' no batch set, 'none' a batch with "
        f"no adapter (host metadata), '{SLOTS} lora' {SLOTS} distinct adapters (device metadata)"
    )
    print(
        f"{'site':<8} {'d_in->d_out':>12} {'tokens':>6} {'mode':>5} {'plain':>8} "
        f"{'off':>15} {'none':>15} {f'{SLOTS} lora':>15}"
    )
    for tokens in (64, 2048) if device.type == "cuda" else (8, 64):
        gen = torch.Generator(device=device).manual_seed(tokens)
        batches = (
            None,  # no batch set
            torch.full((tokens,), -1, dtype=torch.int32),
            (torch.arange(tokens, device=device) % SLOTS).to(torch.int32),
        )
        for (site, d_in, d_out), layer in zip(sites, layers, strict=True):
            x = torch.randn(tokens, d_in, device=device, dtype=dtype, generator=gen)
            for mode in modes:
                plain, times = linear_row(layer, bank, x, batches, iters, graph=mode == "graph")
                cells = " ".join(f"{f'{us:8.1f} ({plain / us:.2f})':>15}" for us in times)
                print(
                    f"{site:<8} {f'{d_in}->{d_out}':>12} {tokens:>6} {mode:>5} {plain:>8.1f} {cells}"
                )


def linear_row(layer, bank, x, batches, iters: int, graph: bool) -> tuple[float, list[float]]:
    """µs per call of the plain Linear, and of our layer under each batch (None: none set)."""
    import torch

    with torch.inference_mode():
        plain = per_call_us(lambda: layer.base(x), x.device, iters, graph)
        times = []
        for token_slots in batches:
            if token_slots is None:
                bank.clear_batch()
            else:
                bank.set_batch(token_slots)
            times.append(per_call_us(lambda: layer(x), x.device, iters, graph))
        bank.clear_batch()
    return plain, times


def lora_sites(sites, device, dtype):
    """One LoraLinear per site, through inject_lora (each in its own parent: no shared shrink)."""
    import torch
    from torch import nn

    from loraplane.runtime.lora import inject_lora

    model = nn.Module()
    for i, (_, d_in, d_out) in enumerate(sites):
        parent = nn.Module()
        parent.proj = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
        model.add_module(f"site{i}", parent)
    bank = inject_lora(model, ["proj"], max_slots=SLOTS, max_rank=RANK, backend="triton")
    with torch.no_grad():
        for layer in bank.layers.values():
            layer.lora_a.normal_(0, layer.in_features**-0.5)
            layer.lora_b.normal_(0, RANK**-0.5 * 0.1)
            layer.ranks.fill_(RANK)
            layer.scales.fill_(2.0)
    return [getattr(model, f"site{i}").proj for i in range(len(sites))], bank


if __name__ == "__main__":
    raise SystemExit(main())
