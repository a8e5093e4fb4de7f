"""GPU-only: the serving engine as it runs on a GPU (paged attention, decode CUDA graphs, KV
cache sized from device memory), held to PEFT on the same GPU and to its own eager steps."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from runtime_helpers import RunningServer, make_config, peft_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
PROMPTS = ["the quick brown fox jumps over", "SELECT name FROM users", "hello", "once upon"]
MODELS = ["tiny", "poet", "sql-expert", "support-bot"]
MAX_TOKENS = 8


def gpu_config(demo_dir, tmp_path, **overrides):
    base, adapters = demo_dir
    settings = dict(
        adapters={n: str(p) for n, p in adapters.items()},
        device="cuda",
        dtype="float32",
        max_running=16,
        max_num_batched_tokens=64,  # short prompts still prefill in chunks beside decodes
        kv_cache_tokens=8192,  # sized from memory in its own test
    )
    return make_config(base, tmp_path, **(settings | overrides))


async def answers(server: RunningServer) -> list[str]:
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:

        async def one(model: str, prompt: str) -> str:
            body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        return await asyncio.gather(*(one(m, p) for m in MODELS for p in PROMPTS))


def test_graphs_and_paged_attention_on_cuda_answer_as_peft_does(demo_dir, tmp_path):
    base, adapters = demo_dir
    with RunningServer(gpu_config(demo_dir, tmp_path / "graphs")) as server:
        runner = server.runtime.runner
        assert runner.paged and runner.graphs is not None and runner.graphs.graphs
        replays: list[bool] = []  # per replay: did a pending token come from the device?
        real = runner.graphs.run
        runner.graphs.run = lambda seqs, slots, taken=None: (
            replays.append(taken is not None) or real(seqs, slots, taken)
        )
        got = asyncio.run(answers(server))
    assert replays, "no decode step replayed a graph"
    assert any(replays), "async scheduling never fed a graph a token still on the device"
    for i, model in enumerate(MODELS):
        want = peft_greedy(base, adapters.get(model), PROMPTS, MAX_TOKENS, device="cuda")
        ours = got[i * len(PROMPTS) : (i + 1) * len(PROMPTS)]
        assert ours == want, f"{model}: ours {ours} != PEFT {want}"
    with RunningServer(gpu_config(demo_dir, tmp_path / "eager", enforce_eager=True)) as server:
        assert server.runtime.runner.graphs is None
        assert asyncio.run(answers(server)) == got
    sync = gpu_config(demo_dir, tmp_path / "sync", async_scheduling=False)
    with RunningServer(sync) as server:
        assert asyncio.run(answers(server)) == got


def test_the_engine_process_on_cuda_answers_as_one_process_does(demo_dir, tmp_path):
    from loraplane.runtime.engine_client import RemoteRuntime

    with RunningServer(gpu_config(demo_dir, tmp_path / "one")) as server:
        one = asyncio.run(answers(server))
    config = gpu_config(demo_dir, tmp_path / "two")
    with RunningServer(config, runtime=RemoteRuntime(config)) as server:
        assert asyncio.run(answers(server)) == one


def test_kv_cache_is_sized_from_free_device_memory(demo_dir, tmp_path):
    import gc

    gc.collect()  # other tests' runtimes: their caches are not this one's to count
    torch.cuda.empty_cache()
    config = gpu_config(demo_dir, tmp_path, gpu_memory_utilization=0.5, kv_cache_tokens=None)
    server = RunningServer(config)
    runner = server.runtime.runner
    total = torch.cuda.get_device_properties(0).total_memory
    cache = runner.kv_blocks * runner.kv_block_bytes
    # A tiny model leaves nearly all of half the card to the cache, and never more.
    assert 0.3 * total < cache < 0.5 * total, (cache, total)
    # So large a cache leaves the model's own limit as the longest sequence.
    assert server.runtime.engine.max_seq_len == runner.model.config.max_position_embeddings


def test_host_copies_are_pinned_and_slots_filled_asynchronously(demo_dir, tmp_path):
    with RunningServer(gpu_config(demo_dir, tmp_path)) as server:
        entries = server.runtime.adapters.registered()
        assert entries and all(
            m.a.is_pinned() and m.b.is_pinned()
            for e in entries
            if e.weights is not None
            for m in e.weights.modules.values()
        )
