"""Hot load, replace and unload while requests run: nothing dropped, weights freed for real."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import weakref

import httpx
import pytest
from server_fixtures import RunningServer, copy_adapter, demo_dir, make_config, wait_for  # noqa: F401


@pytest.fixture(scope="module")
def setup(demo_dir, tmp_path_factory):  # noqa: F811
    base, adapters = demo_dir
    tmp = tmp_path_factory.mktemp("hot")
    config = make_config(
        base,
        tmp,
        adapters={"poet": str(adapters["poet"]), "sql-expert": str(adapters["sql-expert"])},
    )
    with RunningServer(config) as running:
        yield running, adapters, tmp


async def test_unload_waits_for_running_requests_and_frees_weights(setup, monkeypatch):
    server, _, _ = setup
    runtime = server.runtime
    real_run = runtime.runner.run

    def slow(seqs, slots):
        time.sleep(0.01)  # the stream must outlast the DELETE below, even on a fast machine
        return real_run(seqs, slots)

    monkeypatch.setattr(runtime.runner, "run", slow)
    entry = runtime.adapters.get("poet")
    weights_ref = weakref.ref(entry.weights)
    slot = entry.lora_slot
    assert slot is not None
    body = {
        "model": "poet",
        "prompt": "hello",
        "max_tokens": 60,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    client = httpx.AsyncClient(base_url=server.url, timeout=120)
    async with client, client.stream("POST", "/v1/completions", json=body) as response:
        lines = response.aiter_lines()
        first = await anext(lines)
        assert first.startswith("data: ")
        gone = await client.delete("/v1/adapters/poet")
        assert gone.json() == {"name": "poet", "state": "unloading"}
        late = await client.post("/v1/completions", json=body | {"stream": False})
        assert late.status_code == 404
        rest = [line async for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    final = json.loads(rest[-2].removeprefix("data: "))
    assert final["choices"][0]["finish_reason"] == "length"
    del entry
    wait_for(lambda: slot not in runtime.engine.scheduler.lora_slots.owner, "the slot to be released")
    gc.collect()
    assert weights_ref() is None, "unloaded adapter weights are still referenced"


async def test_load_replace_unload_under_load_drops_nothing(setup):
    server, adapters, tmp = setup
    statuses: list[tuple[str, int]] = []
    stop = asyncio.Event()

    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

        async def traffic(model: str) -> None:
            for _ in range(200):  # bounded even if stop is never set
                if stop.is_set():
                    return
                r = await client.post(
                    "/v1/completions",
                    json={
                        "model": model,
                        "prompt": "kubernetes operators",
                        "max_tokens": 6,
                        "temperature": 0,
                    },
                )
                statuses.append((model, r.status_code))

        async def served(model: str, at_least: int) -> None:
            # Progress, not wall time, decides when the next change lands: CPUs here are shared.
            deadline = time.monotonic() + 60
            while sum(1 for m, s in statuses if m == model and s == 200) < at_least:
                assert time.monotonic() < deadline, f"{model}: fewer than {at_least} served"
                await asyncio.sleep(0.02)

        workers = [asyncio.create_task(traffic(m)) for m in ("sql-expert", "tiny", "sql-expert")]
        await served("sql-expert", 2)
        r = await client.put(
            "/v1/adapters/support-bot", json={"source": str(adapters["support-bot"])}
        )
        assert r.status_code == 201, r.text
        workers.append(asyncio.create_task(traffic("support-bot")))
        await served("support-bot", 1)
        replacement = copy_adapter(adapters["sql-expert"], tmp / "sql-v2", lora_alpha=2)
        r = await client.put("/v1/adapters/sql-expert", json={"source": str(replacement)})
        assert r.status_code == 201, r.text
        await served("sql-expert", 4)
        r = await client.delete("/v1/adapters/support-bot")
        assert r.status_code == 200
        await served("tiny", 3)
        stop.set()
        await asyncio.gather(*workers)
    by_status: dict[int, int] = {}
    for _, status in statuses:
        by_status[status] = by_status.get(status, 0) + 1
    # 404 only for support-bot after its DELETE; everything else served.
    assert set(by_status) <= {200, 404}, by_status
    assert all(m == "support-bot" for m, s in statuses if s == 404)
    assert sum(1 for m, s in statuses if m == "sql-expert" and s == 200) >= 4
    assert sum(1 for m, s in statuses if m == "support-bot" and s == 200) >= 1
    wait_for(lambda: not server.runtime.adapters.retired, "retired adapters to be reaped")
