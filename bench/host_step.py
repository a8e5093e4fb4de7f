"""Host time per engine step: everything the engine thread does besides the device's work.

    python bench/host_step.py            # batch 64, 128 new tokens each, 3 adapters + base
    python bench/host_step.py --batch 256

The real Runtime (tiny model, real tokenizer, adapters, metrics, streams read by an asyncio
loop as the HTTP routes read them) with ModelRunner.launch replaced by a stub that returns
random tokens at once: the interval between two launches is then the host's whole cost of a
step (scheduling, LoRA slot bookkeeping, accepting tokens, metrics, sending them out). The
text and the stop strings are made by the streams' reader, as the HTTP side makes them: here
in this process, sharing its GIL as with --no-engine-process; with the engine in its own
process (the default) that work is not on the engine's interpreter at all. On a GPU the device runs beside all of it (async scheduling: the
next step is launched before this one's tokens are read); what is printed is the host budget
a step must stay under for the device never to wait. DecodeInputs.fill, the copy of a decode step's
inputs into the graph's buffers, is timed on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="requests decoding together")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--context", type=int, default=1024, help="prompt tokens (fill's tables)")
    return p.parse_args()


class StubStep:
    def __init__(self, tokens) -> None:
        self.tokens = tokens

    def result(self):
        return self.tokens, [-1.0] * len(self.tokens)


def main() -> None:
    args = parse_args()
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")  # the tiny model never runs a kernel here
    import random

    import torch

    from loraplane.runtime.config import RuntimeConfig
    from loraplane.runtime.runtime import Runtime
    from loraplane.runtime.sampling import SamplingParams
    from loraplane.testing.tiny import build_demo

    root = Path(tempfile.mkdtemp(prefix="host-step-"))
    base, adapters = build_demo(root)
    config = RuntimeConfig(
        model=str(base),
        served_model_name="tiny",
        max_running=args.batch,
        max_num_batched_tokens=max(8192, args.batch),
        kv_cache_tokens=args.batch * (args.context + args.new_tokens + 32),
        adapters={n: str(p) for n, p in adapters.items()},
        allow_unauthenticated_admin=True,
        cache_dir=root / "cache",
    )
    runtime = Runtime(config)
    runtime.preload_adapters()
    runner, engine = runtime.runner, runtime.engine
    vocab = runner.model.config.vocab_size
    rng = random.Random(0)
    launches: list[float] = []
    batch_sizes: list[int] = []

    def launch(seqs, slots, chunks=None):
        launches.append(time.perf_counter())
        chunks = chunks or [s.num_uncached for s in seqs]
        last = [c == s.num_uncached for s, c in zip(seqs, chunks, strict=True)]
        batch_sizes.append(len(seqs))
        tokens = [rng.randrange(3, vocab) for done in last if done]
        for seq, chunk in zip(seqs, chunks, strict=True):
            seq.num_cached += chunk  # as ModelRunner.launch does once the step is queued
        return StubStep(tokens)

    runner.launch = launch  # type: ignore[method-assign]
    names = [None, *adapters]
    prompt = [rng.randrange(3, vocab) for _ in range(32)]

    async def drive() -> int:
        runtime.start()
        params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, stop=("\n\n",))
        streams = []
        for i in range(args.batch):
            loop = asyncio.get_running_loop()
            streams += runtime.submit([prompt], params, names[i % len(names)], loop)
        chars = 0
        for stream in streams:
            async for out in stream:
                chars += len(out.text)
        return chars

    chars = asyncio.run(drive())
    engine.stop()
    # Decode steps only: every sequence running, one token each.
    steps = [
        (b - a) * 1e6
        for a, b, n in zip(launches, launches[1:], batch_sizes, strict=False)
        if n == args.batch
    ]
    steps = steps[2:]  # the first after admission still streams the prefill's tokens
    print(f"# host_step: batch {args.batch}, {args.new_tokens} new tokens, {len(names)} models")
    print(f"# {len(launches)} steps, {chars} characters streamed")
    print(
        f"engine step (host only): median {statistics.median(steps):.0f} us, "
        f"p90 {sorted(steps)[int(0.9 * len(steps))]:.0f} us, "
        f"{statistics.median(steps) / args.batch:.1f} us per sequence"
    )

    from loraplane.runtime.cuda_graphs import DecodeInputs
    from loraplane.runtime.sequence import Sequence

    bs = config.block_size
    width = -(-(args.context + args.new_tokens) // bs)
    inputs = DecodeInputs(None, None, args.batch, width, bs, 10**9, torch.device("cpu"))  # type: ignore[arg-type]
    seqs = []
    for i in range(args.batch):
        seq = Sequence(list(range(args.context)), SamplingParams())
        seq.output_ids = [5] * 8
        seq.num_cached = args.context + 7
        seq.block_table = list(range(i * width, (i + 1) * width))
        seqs.append(seq)
    slots = [i % 8 for i in range(args.batch)]
    for _ in range(5):
        inputs.fill(seqs, slots, args.batch)
    t0 = time.perf_counter()
    for _ in range(200):
        inputs.fill(seqs, slots, args.batch)
    fill_us = (time.perf_counter() - t0) / 200 * 1e6
    print(f"DecodeInputs.fill, context {args.context}: {fill_us:.0f} us")
    print(f"# load average {os.getloadavg()[0]:.2f} (a loaded CPU slows every number here)")


if __name__ == "__main__":
    main()
