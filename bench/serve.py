"""The runtime over HTTP against PEFT's generate, on the same fixed mixed-adapter workload.

A fixed list of requests (base and N adapters interleaved, prompts of varied length, a fixed
number of new tokens each) goes to loraplane-runtime, started as its own process on
127.0.0.1, from `--concurrency` concurrent clients; then to PEFT's own mixed-adapter batched
generate (adapter_names=, left padding) in batches of the same size, in the same run. Prints
generated tokens/s of each and the ratio.

    python bench/serve.py --cpu --tiny     # about a minute on a CPU
    python bench/serve.py                  # GPU, bf16, a ~100M-parameter model, 8 adapters
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    # model spec, adapters, requests, concurrency, new tokens
    "tiny": (
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        4,
        48,
        16,
        16,
    ),
    "small": (
        {
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_hidden_layers": 8,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "max_position_embeddings": 2048,
        },
        8,
        256,
        64,
        64,
    ),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run both sides on the CPU in float32")
    p.add_argument("--tiny", action="store_true", help="the tiny model (CI-friendly on a CPU)")
    p.add_argument("--work-dir", type=Path, default=None, help="default: a temporary dir")
    return p.parse_args()


def build(work: Path, size: str):
    from loraplane.testing.tiny import TinyAdapterSpec, TinyModelSpec, build_adapter, build_model

    spec, n_adapters, *_ = SIZES[size]
    base = work / f"base-{size}"
    if not (base / "config.json").exists():
        build_model(base, TinyModelSpec(**spec))
    adapters = {}
    for i in range(n_adapters):
        path = work / f"adapter-{size}-{i}"
        if not (path / "adapter_config.json").exists():
            targets = TARGETS if i % 2 == 0 else ("q_proj", "v_proj")
            build_adapter(
                path,
                base,
                TinyAdapterSpec(
                    r=16 if i % 2 == 0 else 8, lora_alpha=16, target_modules=targets, seed=100 + i
                ),
            )
        adapters[f"a{i}"] = path
    return base, adapters


def workload(names: list[str], n: int, tokenizer) -> list[tuple[str | None, str]]:
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


def start_server(base: Path, adapters: dict[str, Path], device: str, dtype: str, work: Path):
    import httpx

    port = free_port()
    args = [
        sys.executable,
        "-m",
        "loraplane.runtime",
        "--model",
        str(base),
        "--served-model-name",
        "base",
        "--port",
        str(port),
        "--device",
        device,
        "--dtype",
        dtype,
        "--max-adapters",
        str(len(adapters)),
        "--max-batch-tokens",
        "16384",
        "--max-running",
        "256",
        "--max-queue",
        "4096",
        "--cache-dir",
        str(work / "cache"),
        "--log-level",
        "warning",
        # Adapters are preloaded from the command line; nothing here uses the admin API.
        "--allow-unauthenticated-admin",
    ]
    for name, path in adapters.items():
        args += ["--adapter", f"{name}={path}"]
    proc = subprocess.Popen(args)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
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
    raise SystemExit("the runtime was not ready in 300 s")


async def run_server(url: str, jobs, concurrency: int, new_tokens: int) -> tuple[int, float]:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(model: str | None, prompt: str) -> int:
            async with gate:
                r = await client.post(
                    "/v1/completions",
                    json={
                        "model": model or "base",
                        "prompt": prompt,
                        "max_tokens": new_tokens,
                        "temperature": 0,
                        "ignore_eos": True,
                    },
                )
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]

        await one(*jobs[0])  # warm-up
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(m, p) for m, p in jobs))
        return sum(counts), time.perf_counter() - start


def run_peft(base: Path, adapters, jobs, batch: int, new_tokens: int, device: str, dtype: str):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch_dtype).to(device)
    names = list(adapters)
    model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()

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

    generate(jobs[:2])  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = sum(generate(jobs[i : i + batch]) for i in range(0, len(jobs), batch))
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - start


def main() -> int:
    args = parse_args()
    device = "cpu" if args.cpu else "cuda"
    dtype = "float32" if args.cpu else "bfloat16"
    size = "tiny" if args.tiny else "small"
    _, n_adapters, n_requests, concurrency, new_tokens = SIZES[size]
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu --tiny to prove the script on a CPU")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="loraplane-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    base, adapters = build(work, size)
    jobs = workload(list(adapters), n_requests, None)
    print(f"# bench/serve.py {size} on {device} ({dtype}), {platform.node()}")
    print(
        f"# {n_requests} requests, {n_adapters} adapters + base, concurrency {concurrency}, "
        f"{new_tokens} new tokens each"
    )
    proc, url = start_server(base, adapters, device, dtype, work)
    try:
        server_tokens, server_s = asyncio.run(run_server(url, jobs, concurrency, new_tokens))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    peft_tokens, peft_s = run_peft(base, adapters, jobs, concurrency, new_tokens, device, dtype)
    ours, theirs = server_tokens / server_s, peft_tokens / peft_s
    print(
        f"loraplane-runtime over HTTP: {server_tokens} tokens in {server_s:.2f} s = "
        f"{ours:.1f} tokens/s"
    )
    print(
        f"PEFT generate (mixed batches of {concurrency}): {peft_tokens} tokens in "
        f"{peft_s:.2f} s = {theirs:.1f} tokens/s"
    )
    print(f"ratio runtime / PEFT: {ours / theirs:.2f}x")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
