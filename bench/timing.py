"""Timing helpers shared by the benchmarks: CUDA events and graphs on a GPU, a clock on the CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def median_ms(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median wall time of one fn() call in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def capture(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """fn as a replayable CUDA graph on a GPU (kernels compiled first); fn itself on the CPU.

    The replay returns what fn returned while captured: the graph's static output, which
    each replay overwrites.
    """
    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile and autotune outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> Any:
        graph.replay()
        return out

    return replay


def verdict(ok: bool, cpu: bool) -> str:
    return (
        ("pass" if ok else "fail") + " (cpu tiny: not a speed measurement)"
        if cpu
        else ("PASS" if ok else "FAIL")
    )
