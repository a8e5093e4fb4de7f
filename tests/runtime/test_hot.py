"""Hot load, replace and unload while requests run: nothing dropped, weights freed for real."""

from __future__ import annotations

import asyncio
import gc
import json
import weakref

import httpx
import pytest
from runtime_helpers import RunningServer, copy_adapter, make_config, wait_for


@pytest.fixture(scope="module")
def setup(demo_dir, tmp_path_factory):
    base, adapters = demo_dir
    tmp = tmp_path_factory.mktemp("hot")
    config = make_config(
        base,
        tmp,
        adapters={"poet": str(adapters["poet"]), "sql-expert": str(adapters["sql-expert"])},
    )
    with RunningServer(config) as running:
        yield running, adapters, tmp


async def test_unload_waits_for_running_requests_and_frees_weights(setup, step_gate):
    server, _, _ = setup
    runtime = server.runtime
    gate = step_gate(runtime.runner)
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
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

        async def read_stream() -> list[str]:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                return [line async for line in response.aiter_lines() if line.startswith("data: ")]

        reading = asyncio.create_task(read_stream())
        # The gate holds the stream at its first step: it outlasts the DELETE below.
        tally = runtime.engine.tally
        await asyncio.to_thread(wait_for, lambda: tally.in_flight == 1, "the stream accepted")
        gone = await client.delete("/v1/adapters/poet")
        assert gone.json() == {"name": "poet", "state": "unloading"}
        late = await client.post("/v1/completions", json=body | {"stream": False})
        assert late.status_code == 404
        gate.open()
        rest = await reading
    assert rest[-1] == "data: [DONE]"
    final = json.loads(rest[-2].removeprefix("data: "))
    assert final["choices"][0]["finish_reason"] == "length"
    del entry
    wait_for(
        lambda: slot not in runtime.engine.scheduler.lora_slots.owner, "the slot to be released"
    )
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
            def enough() -> bool:
                return sum(1 for m, s in statuses if m == model and s == 200) >= at_least

            await asyncio.to_thread(wait_for, enough, f"{at_least} answers from {model}")

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
