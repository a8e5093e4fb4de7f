"""Load at twice capacity: only 200s and 429s (with Retry-After), never a 5xx, memory flat.

Capacity is --max-running + --max-queue requests at once; twice that many clients send
requests back to back, mixing adapters, the base and streaming. `make test-slow` runs it; the
figures it prints are the ones in docs/security.md.
"""

from __future__ import annotations

import asyncio
import os
import resource
from collections import Counter

import httpx
import pytest
from runtime_helpers import RunningServer, make_config

MAX_RUNNING, MAX_QUEUE = 4, 8
CLIENTS = 2 * (MAX_RUNNING + MAX_QUEUE)
REQUESTS_PER_CLIENT = 50
RSS_GROWTH_LIMIT = 64 << 20  # over the whole run, after a warm-up round


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_twice_capacity_gives_429s_never_5xx_and_flat_memory(demo_dir, tmp_path):
    base, adapters = demo_dir
    config = make_config(
        base,
        tmp_path,
        adapters={name: str(path) for name, path in adapters.items()},
        max_running=MAX_RUNNING,
        max_queue=MAX_QUEUE,
        max_num_batched_tokens=512,
    )
    models = ["tiny", *adapters]

    async def client(i: int, rounds: int, codes: Counter, bad: list[str]) -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            for n in range(rounds):
                model = models[(i + n) % len(models)]
                body = {
                    "model": model,
                    "prompt": f"hello {n}",
                    "max_tokens": 8,
                    "stream": n % 3 == 0,
                }
                r = await http.post(f"{server.url}/v1/completions", json=body)
                codes[r.status_code] += 1
                if r.status_code == 429 and not r.headers.get("retry-after"):
                    bad.append("429 without Retry-After")
                elif r.status_code not in (200, 429):
                    bad.append(f"{r.status_code}: {r.text[:200]}")

    async def load(rounds: int) -> tuple[Counter, list[str]]:
        codes: Counter = Counter()
        bad: list[str] = []
        await asyncio.gather(*(client(i, rounds, codes, bad) for i in range(CLIENTS)))
        return codes, bad

    with RunningServer(config) as server:
        asyncio.run(load(2))  # warm-up: allocator pools, tokenizer caches, metric series
        before = rss_bytes()
        codes, bad = asyncio.run(load(REQUESTS_PER_CLIENT))
        growth = rss_bytes() - before
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(
            f"\n{CLIENTS} clients x {REQUESTS_PER_CLIENT} requests at capacity "
            f"{MAX_RUNNING}+{MAX_QUEUE}: {dict(codes)}; RSS growth {growth / 2**20:.1f} MiB, "
            f"peak {peak / 2**20:.0f} MiB"
        )
        assert not bad, bad[:5]
        assert codes[200] > 0 and codes[429] > 0, codes  # it was really over capacity
        assert growth < RSS_GROWTH_LIMIT, growth
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        assert server.runtime.engine.idle()
