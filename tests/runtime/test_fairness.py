"""No adapter starves another: a burst for one adapter does not hold back a lone request."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from server_fixtures import RunningServer, demo_dir, make_config  # noqa: F401


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):  # noqa: F811
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


async def test_a_lone_request_overtakes_another_adapters_burst(server, monkeypatch):
    real_run = server.runtime.runner.run

    def slow(seqs, slots):
        time.sleep(0.005)
        return real_run(seqs, slots)

    monkeypatch.setattr(server.runtime.runner, "run", slow)
    finished: list[str] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

        async def one(model: str, tag: str) -> None:
            r = await client.post(
                "/v1/completions",
                json={"model": model, "prompt": "hello", "max_tokens": 20, "ignore_eos": True},
            )
            assert r.status_code == 200, r.text
            finished.append(tag)

        burst = [asyncio.create_task(one("poet", f"poet-{i}")) for i in range(8)]
        deadline = time.monotonic() + 30
        while server.runtime.engine.scheduler.num_waiting < 6:  # the burst is queued
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        await one("sql-expert", "sql")
        await asyncio.gather(*burst)
    # Two run at a time; round-robin admits the lone request at the next free row, so it
    # finishes among the first few, not after the whole burst.
    assert finished.index("sql") <= 3, finished
