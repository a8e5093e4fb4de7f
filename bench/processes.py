"""What the HTTP side's work costs the engine: one process against the engine in its own.

    python bench/processes.py                    # 64 streaming clients, a 20 ms device step
    python bench/processes.py --device-ms 10 --clients 128

The runtime serves the tiny model with its device replaced by a stub that takes --device-ms
per step, queued one after another as on a GPU, and whose wait releases the GIL as a CUDA
event's does: the engine thread then spends each step as it would beside a GPU, waiting,
and everything else it does is host time the device would be idle for unless it overlaps.
--clients clients stream every token (SSE) from another process. The server runs twice,
with --no-engine-process and with the engine in its own process; for each the engine's
median interval between launches at full batch is printed (the device's step time when the
host keeps up), its ratio to --device-ms, and the clients' tokens/s.

On a CPU this measures the effect the engine process exists for: in one process every SSE
chunk formatted and every token made into text holds the GIL the engine thread needs when
the device finishes. It needs cores for the clients and the HTTP process: on 2 cores they
compete, and the load average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS_FILE_ENV = "LORAPLANE_BENCH_STEPS_FILE"  # where the stub device logs each launch
DEVICE_MS_ENV = "LORAPLANE_BENCH_DEVICE_MS"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device-ms", type=float, default=20.0, help="the stub device's step time")
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens each request streams")
    p.add_argument("--rounds", type=int, default=3, help="requests per client")
    p.add_argument("--serve", choices=("one", "two"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args()


# -- the stub device (runs in whichever process steps the engine) ----------------------------


class StubStep:
    def __init__(self, tokens: list[int], done_at: float) -> None:
        self.tokens, self.done_at = tokens, done_at

    def result(self) -> tuple[list[int], list[float]]:
        wait = self.done_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)  # releases the GIL, as waiting on a CUDA event does
        return self.tokens, [-1.0] * len(self.tokens)


def stub_device() -> None:
    """Replace ModelRunner.launch: steps queue on one stream of --device-ms each; each
    launch's time and batch size go to the steps file, one write each."""
    import random

    from loraplane.runtime.model_runner import ModelRunner

    step_s = float(os.environ[DEVICE_MS_ENV]) / 1000
    log = os.open(os.environ[STEPS_FILE_ENV], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    rng = random.Random(0)
    free_at = 0.0

    def launch(self, seqs, lora_slots, chunks=None):
        nonlocal free_at
        now = time.perf_counter()
        chunks = chunks or [s.num_uncached for s in seqs]
        sampled = [c == s.num_uncached for s, c in zip(seqs, chunks, strict=True)]
        for seq, chunk in zip(seqs, chunks, strict=True):
            seq.num_cached += chunk  # as the real launch counts a queued step
        os.write(log, f"{now} {len(seqs)}\n".encode())
        free_at = max(now, free_at) + step_s
        vocab = self.model.config.vocab_size
        return StubStep([rng.randrange(3, vocab) for last in sampled if last], free_at)

    ModelRunner.launch = launch  # type: ignore[method-assign]


def engine_main(config, conn, log_level) -> None:
    """The engine process's entry point with the stub device in it."""
    from loraplane.runtime import engine_process

    stub_device()
    engine_process.main(config, conn, log_level)


def serve(args: argparse.Namespace) -> None:
    """The server subprocess: the runtime with the stub device, one process or two."""
    import uvicorn

    from loraplane.runtime.config import RuntimeConfig
    from loraplane.runtime.server import create_app

    base = args.model_dir / "base"
    config = RuntimeConfig(
        model=str(base),
        served_model_name="tiny",
        port=args.port,
        max_running=256,
        max_queue=4096,
        max_num_batched_tokens=8192,
        kv_cache_tokens=65536,
        adapters={n.name: str(n) for n in sorted((args.model_dir / "adapters").iterdir())},
        allow_unauthenticated_admin=True,
        cache_dir=args.model_dir / "cache",
        engine_process=args.serve == "two",
    )
    if args.serve == "two":
        from loraplane.runtime.engine_client import RemoteRuntime

        runtime = RemoteRuntime(config, target=engine_main)
    else:
        from loraplane.runtime.runtime import Runtime

        stub_device()
        runtime = Runtime(config)
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), port=args.port, log_level="error"))
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    server.run()


# -- the driver ---------------------------------------------------------------------------------


async def clients(url: str, args: argparse.Namespace, models: list[str]) -> tuple[int, float]:
    import httpx

    limits = httpx.Limits(max_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(i: int) -> int:
            got = 0
            for r in range(args.rounds):
                body = {
                    "model": models[(i + r) % len(models)],
                    "prompt": "the sea at night",
                    "max_tokens": args.new_tokens,
                    "ignore_eos": True,
                    "stream": True,
                }
                async with client.stream("POST", "/v1/completions", json=body) as resp:
                    resp.raise_for_status()
                    async for line in resp.aiter_lines():
                        if line.startswith('data: {"id"'):
                            got += bool(json.loads(line[6:])["choices"][0]["text"])
            return got

        start = time.perf_counter()
        chunks = await asyncio.gather(*(one(i) for i in range(args.clients)))
        return sum(chunks), time.perf_counter() - start


def run_mode(args: argparse.Namespace, mode: str, model_dir: Path, work: Path) -> dict:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    steps_file = work / f"steps-{mode}.txt"
    env = os.environ | {
        STEPS_FILE_ENV: str(steps_file),
        DEVICE_MS_ENV: str(args.device_ms),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, __file__, "--serve", mode, "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--model-dir", str(model_dir)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the {mode}-process server did not start")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        models = ["tiny", *sorted(p.name for p in (model_dir / "adapters").iterdir())]
        asyncio.run(clients(url, args, models))  # untimed: every path warm
        steps_file.write_text("")
        tokens, seconds = asyncio.run(clients(url, args, models))
        lines = steps_file.read_text().split()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    times = [float(t) for t in lines[0::2]]
    sizes = [int(n) for n in lines[1::2]]
    full = [
        (b - a) * 1000
        for a, b, n in zip(times, times[1:], sizes, strict=False)
        if n == args.clients
    ]
    full.sort()
    return {
        "step_ms": statistics.median(full) if full else float("nan"),
        "p90_ms": full[int(0.9 * len(full))] if full else float("nan"),
        "full_steps": len(full),
        "tokens_s": tokens / seconds,
    }


def main() -> int:
    args = parse_args()
    if args.serve:
        serve(args)
        return 0
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the stub runs no kernel
    from loraplane.testing.tiny import build_demo

    work = Path(tempfile.mkdtemp(prefix="loraplane-bench-processes-"))
    build_demo(work / "models")
    print(
        f"# bench/processes.py: stub device {args.device_ms:g} ms/step, {args.clients} clients "
        f"streaming {args.new_tokens} tokens x {args.rounds} rounds; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    results = {}
    for mode, label in (("one", "one process"), ("two", "engine in its own process")):
        r = results[mode] = run_mode(args, mode, work / "models", work)
        print(
            f"{label}: engine step at batch {args.clients} {r['step_ms']:.1f} ms median, "
            f"{r['p90_ms']:.1f} p90 ({r['step_ms'] / args.device_ms:.2f}x the device's "
            f"{args.device_ms:g} ms, "
            f"{r['full_steps']} steps); clients {r['tokens_s']:.0f} tokens/s; load average "
            f"{os.getloadavg()[0]:.2f}"
        )
    one, two = results["one"], results["two"]
    print(
        f"ratio engine process / one process: step time {two['step_ms'] / one['step_ms']:.2f}x, "
        f"client tokens/s {two['tokens_s'] / one['tokens_s']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
