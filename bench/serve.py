"""The runtime over HTTP against PEFT's generate, on the same fixed mixed-adapter workload.

A fixed list of requests (base and N adapters interleaved, prompts of varied length, a fixed
number of new tokens each) goes to loraplane-runtime, started as its own process on
127.0.0.1, from `--concurrency` concurrent clients; then to PEFT's own mixed-adapter batched
generate (adapter_names=, left padding) in batches of the same size, in the same run. Each
side first serves the whole mix once untimed, so every shape is compiled, captured and
allocated before the timed pass. Prints generated tokens/s of each and the ratio.

    python bench/serve.py --cpu --tiny                               # about a minute on a CPU
    python bench/serve.py                                            # GPU, ~100M model, 8 adapters
    python bench/serve.py --model llama3-8b-shaped --adapters 32     # GPU, 7B, 32 rank-16
    python bench/serve.py --cpu --tiny --stream --engine-process-ratio  # one process vs two

--engine-process-ratio serves the same mix twice instead of PEFT: with the engine in the HTTP
server's process (--no-engine-process) and in its own (the default), and prints the ratio.

On a CPU both sides run with the same number of torch threads (--threads), and the load
average is printed before and after each: other work on the machine moves the ratio more
than anything measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_models import PRESETS, build


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run both sides on the CPU in float32")
    p.add_argument("--tiny", action="store_true", help="= --model tiny (CI-friendly on a CPU)")
    p.add_argument("--model", choices=sorted(PRESETS), help="default: small (tiny with --tiny)")
    p.add_argument("--adapters", type=int, help="distinct adapters (default: the model's preset)")
    p.add_argument("--requests", type=int, help="requests in the mix (default: the preset's)")
    p.add_argument("--concurrency", type=int, help="clients / PEFT batch size (preset's)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per request (preset's)")
    p.add_argument("--threads", type=int, help="torch threads on each side (CPU: half the cores)")
    p.add_argument("--no-peft", action="store_true", help="time only the runtime")
    p.add_argument("--stream", action="store_true", help="clients stream (SSE) every token")
    p.add_argument(
        "--engine-process-ratio",
        action="store_true",
        help="the runtime with its engine in its own process against one process, no PEFT",
    )
    p.add_argument("--work-dir", type=Path, default=None, help="default: a temporary dir, removed")
    args = p.parse_args()
    args.model = args.model or ("tiny" if args.tiny else "small")
    preset = PRESETS[args.model]
    if preset.on_gpu and args.cpu:
        p.error(f"--model {args.model} is built on the GPU in bf16: drop --cpu")
    for field in ("adapters", "requests", "concurrency", "new_tokens"):
        if getattr(args, field) is None:
            setattr(args, field, getattr(preset, field))
    if args.threads is None and args.cpu:
        args.threads = max(1, (os.cpu_count() or 2) // 2)
    return args


def workload(names: list[str], n: int) -> list[tuple[str | None, str]]:
    from loraplane.testing.tiny import CORPUS

    jobs = []
    for i in range(n):
        # One in five requests goes to the base model; prompts of 1 to 3 corpus lines.
        model = None if i % 5 == 4 else names[i % len(names)]
        prompt = " ".join(CORPUS[(i + k) % len(CORPUS)] for k in range(1 + i % 3))
        jobs.append((model, prompt))
    return jobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(
    args, base: Path, adapters: dict[str, Path], work: Path, port: int, engine_process: bool
) -> list:
    cmd = [sys.executable, "-m", "loraplane.runtime", "--model", str(base)]
    if not engine_process:
        cmd += ["--no-engine-process"]
    cmd += ["--served-model-name", "base", "--port", str(port)]
    cmd += ["--device", "cpu" if args.cpu else "cuda"]
    cmd += ["--dtype", "float32" if args.cpu else "bfloat16"]
    cmd += ["--max-adapters", str(len(adapters)), "--max-lora-rank", "16"]
    cmd += ["--max-batch-tokens", "16384", "--max-running", "256", "--max-queue", "4096"]
    cmd += ["--cache-dir", str(work / "cache"), "--log-level", "warning"]
    # Adapters are preloaded from the command line; nothing here uses the admin API.
    cmd += ["--allow-unauthenticated-admin"]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    return cmd


def start_server(
    args, base: Path, adapters: dict[str, Path], work: Path, engine_process: bool = True
):
    import httpx

    port = free_port()
    env = dict(os.environ)
    if args.threads:  # torch takes its intra-op thread count from these at start
        env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    command = server_command(args, base, adapters, work, port, engine_process)
    proc = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the runtime exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the runtime was not ready in 600 s")


async def run_server(
    url: str, jobs, concurrency: int, new_tokens: int, stream: bool = False
) -> tuple[int, float]:
    """(tokens, seconds) of the timed pass, after an untimed pass of the same mix."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:

        async def one(model: str | None, prompt: str) -> int:
            body = {
                "model": model or "base",
                "prompt": prompt,
                "max_tokens": new_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            async with gate:
                if not stream:
                    r = await client.post("/v1/completions", json=body)
                    r.raise_for_status()
                    return r.json()["usage"]["completion_tokens"]
                body |= {"stream": True, "stream_options": {"include_usage": True}}
                usage = 0
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if line.startswith('data: {"id"') and '"usage": {' in line:
                            usage = json.loads(line[6:])["usage"]["completion_tokens"]
                return usage

        await asyncio.gather(*(one(m, p) for m, p in jobs))  # warm-up: every shape once
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(m, p) for m, p in jobs))
        return sum(counts), time.perf_counter() - start


def load_peft(base: Path, adapters: dict[str, Path], device: str, dtype: str):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch_dtype).to(device)
    names = list(adapters)
    model = PeftModel.from_pretrained(
        model, str(adapters[names[0]]), adapter_name=names[0], low_cpu_mem_usage=True
    )
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name, low_cpu_mem_usage=True)
    return tok, model.to(device).eval()


def run_peft(tok, model, jobs, batch: int, new_tokens: int, device: str) -> tuple[int, float]:
    """(tokens, seconds) of the timed pass, after an untimed pass of the same mix."""
    import torch

    def generate(chunk) -> int:
        enc = tok(
            [p for _, p in chunk], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(device)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                adapter_names=[m or "__base__" for m, _ in chunk],
            )
        return (out.shape[1] - enc.input_ids.shape[1]) * len(chunk)

    def one_pass() -> int:
        return sum(generate(jobs[i : i + batch]) for i in range(0, len(jobs), batch))

    one_pass()  # warm-up: every batch shape once
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = one_pass()
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - start


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    args = parse_args()
    device = "cpu" if args.cpu else "cuda"
    dtype = "float32" if args.cpu else "bfloat16"
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu --tiny to prove the script on a CPU")
    if args.threads:
        torch.set_num_threads(args.threads)  # PEFT's side; the server gets the same by env
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="loraplane-bench-serve-", dir=scratch()))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return measure(args, work, device, dtype)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def scratch() -> str | None:
    # An 8B-shaped base is 14 GB: on a machine with the RAM, tmpfs writes it in seconds.
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > 40 * 2**30 else None


def measure(args, work: Path, device: str, dtype: str) -> int:
    t0 = time.perf_counter()
    base, adapters = build(work, args.model, args.adapters)
    jobs = workload(list(adapters), args.requests)
    print(f"# bench/serve.py {args.model} on {device} ({dtype}), {platform.node()}")
    print(
        f"# {args.requests} requests, {args.adapters} adapters + base, concurrency "
        f"{args.concurrency}, {args.new_tokens} new tokens each; every side serves the mix "
        f"once untimed first; threads {args.threads or 'torch default'}; built in "
        f"{time.perf_counter() - t0:.0f} s"
    )
    print(f"# load average before the runtime: {loadavg()}  ({os.cpu_count()} CPUs)")
    if args.engine_process_ratio:
        return engine_process_ratio(args, base, adapters, work, jobs)
    t0 = time.perf_counter()
    proc, url = start_server(args, base, adapters, work)
    ready = time.perf_counter() - t0
    try:
        ours = asyncio.run(run_server(url, jobs, args.concurrency, args.new_tokens, args.stream))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    print(f"# load average after the runtime: {loadavg()}")
    print(
        f"loraplane-runtime over HTTP: {ours[0]} tokens in {ours[1]:.2f} s = "
        f"{ours[0] / ours[1]:.1f} tokens/s  (ready in {ready:.0f} s)"
    )
    if args.no_peft:
        return 0
    t0 = time.perf_counter()
    tok, model = load_peft(base, adapters, device, dtype)
    loaded = time.perf_counter() - t0
    print(f"# load average before PEFT: {loadavg()}")
    theirs = run_peft(tok, model, jobs, args.concurrency, args.new_tokens, device)
    print(f"# load average after PEFT: {loadavg()}")
    print(
        f"PEFT generate (mixed batches of {args.concurrency}): {theirs[0]} tokens in "
        f"{theirs[1]:.2f} s = {theirs[0] / theirs[1]:.1f} tokens/s  (loaded in {loaded:.0f} s)"
    )
    print(f"ratio runtime / PEFT: {ours[0] / ours[1] / (theirs[0] / theirs[1]):.2f}x")
    return 0


def engine_process_ratio(args, base: Path, adapters: dict[str, Path], work: Path, jobs) -> int:
    """The same mix on one process and on two (engine apart), side by side in one run."""
    rates = {}
    for engine_process in (False, True):
        label = "engine in its own process" if engine_process else "one process"
        proc, url = start_server(args, base, adapters, work, engine_process)
        try:
            tokens, seconds = asyncio.run(
                run_server(url, jobs, args.concurrency, args.new_tokens, args.stream)
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        rates[engine_process] = tokens / seconds
        print(
            f"{label}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tokens/s  "
            f"(load average after: {loadavg()})"
        )
    print(f"ratio engine process / one process: {rates[True] / rates[False]:.2f}x")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
