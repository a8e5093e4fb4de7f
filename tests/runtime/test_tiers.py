"""GPU slots and the host tier: LRU, pinning, and adapters swapped in without wrong outputs."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from runtime_helpers import RunningServer, copy_adapter, make_config, peft_greedy, wait_for

PROMPT = "the quick brown fox"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def setup(demo_dir, tmp_path_factory):
    base, adapters = demo_dir
    tmp = tmp_path_factory.mktemp("tiers")
    dirs = dict(adapters) | {
        "poet-two": copy_adapter(adapters["poet"], tmp / "poet2", lora_alpha=32)
    }
    # Two slots and one host copy for four adapters: at least one lives only on disk.
    config = make_config(
        base,
        tmp,
        max_adapters=2,
        max_cpu_adapters=1,
        adapters={n: str(p) for n, p in dirs.items()},
    )
    with RunningServer(config) as running:
        yield running, base, dirs


def tiers(server) -> dict[str, str]:
    return {a["name"]: a["tier"] for a in httpx.get(f"{server.url}/v1/adapters").json()["adapters"]}


async def ask_all(server, models: list[str]) -> list[str]:
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

        async def one(model: str) -> str:
            r = await client.post(
                "/v1/completions",
                json={"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0},
            )
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        return list(await asyncio.gather(*(one(m) for m in models)))


async def test_more_adapters_than_slots_all_served_correctly(setup):
    server, base, dirs = setup
    # The engine places registered adapters at its next step: two slots, one host copy.
    settled = ["cpu", "disk", "gpu", "gpu"]
    wait_for(lambda: sorted(tiers(server).values()) == settled, f"tiers {settled}")
    names = list(dirs)
    # Every adapter twice, concurrently: slots are swapped between steps as requests finish.
    got = await ask_all(server, names * 2)
    for i, name in enumerate(names):
        expected = peft_greedy(base, dirs[name], [PROMPT], MAX_TOKENS)[0]
        assert got[i] == got[i + len(names)] == expected, name
    assert sorted(tiers(server).values()) == ["cpu", "disk", "gpu", "gpu"]


async def test_pinned_adapter_is_never_evicted(setup):
    server, _, dirs = setup
    for name in ["poet", "support-bot", "poet-two"]:  # LRU pushes sql-expert to disk
        await ask_all(server, [name])
    assert tiers(server)["sql-expert"] == "disk"
    r = httpx.put(
        f"{server.url}/v1/adapters/sql-expert",
        json={"source": str(dirs["sql-expert"]), "pinned": True},
    )
    assert r.status_code == 200 and r.json()["pinned"], r.text
    # Pinning another would leave no slot for unpinned adapters.
    r = httpx.put(
        f"{server.url}/v1/adapters/poet", json={"source": str(dirs["poet"]), "pinned": True}
    )
    assert r.status_code == 409 and "pinned" in r.json()["error"]["message"]
    # The pin takes effect at the engine's next step, even from the disk tier.
    wait_for(lambda: tiers(server)["sql-expert"] == "gpu", "the pinned adapter in a slot")
    for name in ["poet", "support-bot", "poet-two", "poet", "support-bot"]:
        await ask_all(server, [name])
        assert tiers(server)["sql-expert"] == "gpu"
        assert tiers(server)[name] == "gpu"


def test_a_read_back_refuses_files_changed_since_the_load(demo_dir, tmp_path):
    import threading

    from runtime_helpers import rewrite_weights

    from loraplane.runtime.adapters.entry import AdapterEntry
    from loraplane.runtime.adapters.host_tier import HostTier
    from loraplane.runtime.adapters.sources import sha256_file

    _, adapters = demo_dir
    local = copy_adapter(adapters["poet"], tmp_path / "poet")
    sha = sha256_file(local / "adapter_model.safetensors")
    host = HostTier(threading.RLock(), 1, lambda: None)

    def read_back() -> AdapterEntry:
        entry = AdapterEntry("poet", str(local), None, None, sha, local, 4, [], 0)
        host.read_back(entry)  # from the disk tier, on the reader thread
        wait_for(lambda: entry.weights is not None or entry.error is not None, "the read-back")
        return entry

    assert read_back().weights is not None
    rewrite_weights(local, lambda t: {k: v * 2 for k, v in t.items()})  # edited in place
    entry = read_back()
    assert entry.weights is None and "changed since the load" in (entry.error or "")
    host.close()
