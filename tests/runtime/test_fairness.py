"""No adapter starves another: a burst for one adapter does not hold back a lone request."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from runtime_helpers import RunningServer, make_config, wait_for


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    base, adapters = demo_dir
    config = make_config(
        base,
        tmp_path_factory.mktemp("fair"),
        max_running=2,
        max_queue=64,
        adapters={"poet": str(adapters["poet"]), "sql-expert": str(adapters["sql-expert"])},
    )
    with RunningServer(config) as running:
        yield running


async def test_a_lone_request_overtakes_another_adapters_burst(server, step_gate):
    gate = step_gate(server.runtime.runner)
    tally = server.runtime.engine.tally
    finished: list[str] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

        async def one(model: str, tag: str) -> None:
            r = await client.post(
                "/v1/completions",
                json={"model": model, "prompt": "hello", "max_tokens": 20, "ignore_eos": True},
            )
            assert r.status_code == 200, r.text
            finished.append(tag)

        # The gate holds the first step, so the whole burst is queued before the lone one.
        burst = [asyncio.create_task(one("poet", f"poet-{i}")) for i in range(8)]
        await asyncio.to_thread(wait_for, lambda: tally.in_flight == 8, "the burst accepted")
        lone = asyncio.create_task(one("sql-expert", "sql"))
        await asyncio.to_thread(wait_for, lambda: tally.in_flight == 9, "the lone one accepted")
        gate.open()
        await asyncio.gather(*burst, lone)
    # Two run at a time; round-robin admits the lone request at the next free row, so it
    # finishes among the first few, not after the whole burst.
    assert finished.index("sql") <= 3, finished
