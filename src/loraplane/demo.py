"""The demo: one tiny base model, three LoRA adapters hot-loaded, one mixed batch, real HTTP.

Builds a tiny random model and real PEFT adapters in a cache dir, starts loraplane-runtime as
its own process on 127.0.0.1, loads the adapters over the admin API, sends one request per
model (the base and each adapter) concurrently with the `openai` client, and prints what came
back and the runtime's metrics. Non-interactive; --keep-serving leaves the server up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx

from loraplane.api.wire import ADMIN_TOKEN_ENV
from loraplane.testing.cache import dev_cache_root
from loraplane.testing.tiny import DEMO_PROMPT

BASE_NAME = "tiny-llama"
METRIC_PREFIXES = (
    "loraplane_requests_total",
    "loraplane_generated_tokens_total",
    "loraplane_adapters{",
    "loraplane_batch_tokens_count",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the runtime exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the runtime at {url} was not ready within {timeout_s:.0f} s")


async def _ask_all(url: str, models: list[str]) -> list[tuple[str, str]]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="demo", max_retries=0)

    async def one(model: str) -> tuple[str, str]:
        done = await client.completions.create(
            model=model, prompt=DEMO_PROMPT, max_tokens=24, temperature=0
        )
        return model, done.choices[0].text

    return await asyncio.gather(*(one(m) for m in models))


def _runtime_command(base: Path, port: int, cache_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "loraplane.runtime",
        "--model",
        str(base),
        "--served-model-name",
        BASE_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--max-adapters",
        "4",
        "--max-num-batched-tokens",
        "2048",
        "--cache-dir",
        str(cache_dir),
        "--log-level",
        "warning",
        # The demo runs on loopback for one user; the operator always sets a token.
        "--allow-unauthenticated-admin",
    ]


def _load_adapters(url: str, token: str, adapters: dict[str, Path]) -> None:
    """Hot-load each adapter over the admin API, as the operator would, and say what it got."""
    headers = {"Authorization": f"Bearer {token}"}
    for name, path in adapters.items():
        r = httpx.put(
            f"{url}/v1/adapters/{name}",
            headers=headers,
            timeout=60,
            json={"source": f"file://{path}"},
        )
        r.raise_for_status()
        info = r.json()
        print(
            f"loaded adapter {name}: rank {info['rank']}, targets "
            f"{','.join(info['target_modules'])}, tier {info['tier']}, "
            f"sha256 {info['sha256'][:12]}"
        )


def _print_metrics(url: str) -> None:
    print("\nmetrics:")
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(METRIC_PREFIXES):
            print(f"  {line}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraplane.demo", description=__doc__)
    parser.add_argument("--cache-dir", type=Path, default=dev_cache_root() / "demo")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--keep-serving", action="store_true", help="leave the server running")
    args = parser.parse_args(argv)

    # A demo prints what it shows: no weight-loading progress bars or library deprecations.
    quiet = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    os.environ.update({k: os.environ.get(k, v) for k, v in quiet.items()})
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    from loraplane.testing.tiny import build_taught_demo

    print(f"building the tiny base model and adapters in {args.cache_dir} ...", flush=True)
    # Each adapter is taught one line to say after the prompt; the random base says noise.
    base, adapters = build_taught_demo(args.cache_dir / "models")
    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    token = secrets.token_hex(16)
    env = os.environ | {ADMIN_TOKEN_ENV: token}
    print(f"starting the runtime on {url}", flush=True)
    proc = subprocess.Popen(_runtime_command(base, port, args.cache_dir / "runtime"), env=env)
    try:
        _wait_ready(url, proc)
        _load_adapters(url, token, adapters)
        models = [BASE_NAME, *adapters]
        print(f"\none concurrent batch, prompt {DEMO_PROMPT!r}, greedy:")
        for model, text in asyncio.run(_ask_all(url, models)):
            print(f"  {model:>12}: {text!r}")
        _print_metrics(url)
        if args.keep_serving:
            print(f"\nserving on {url} (admin token {token}); Ctrl-C to stop", flush=True)
            proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        _stop(proc)
    print(
        "\ndone: the runtime shut down cleanly"
        if proc.returncode == 0
        else f"\nthe runtime exited with code {proc.returncode}"
    )
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
