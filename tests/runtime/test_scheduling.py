"""Chunked prefill, decodes first, the free-block watermark and prefix caching: the scheduler
and block manager on their own, then the whole engine against unchunked, uncached answers."""

from __future__ import annotations

import threading

from runtime_helpers import RunningServer, make_config
from test_engine_parts import NoRegistry, entry

from loraplane.runtime.adapters.host_tier import HostTier
from loraplane.runtime.block_manager import BlockManager
from loraplane.runtime.lora_slot_manager import LoraSlotManager
from loraplane.runtime.sampling import SamplingParams
from loraplane.runtime.scheduler import Scheduler
from loraplane.runtime.sequence import Sequence


def scheduler(blocks: BlockManager, budget: int, max_running: int = 8) -> Scheduler:
    host = HostTier(threading.RLock(), 4, lambda: None)
    return Scheduler(blocks, LoraSlotManager(2, host), NoRegistry(), budget, max_running)


def seq(tokens: list[int], adapter=None) -> Sequence:
    return Sequence(list(tokens), SamplingParams(max_tokens=8), adapter)


def run(step) -> None:
    """What the runner and engine do after a forward: cache the chunk, sample at the end."""
    for s, chunk, last in zip(step.seqs, step.chunks, step.samples, strict=True):
        s.num_cached += chunk
        if last:
            s.output_ids.append(7)


def test_a_long_prompt_is_prefilled_in_chunks_and_decodes_go_first():
    sched = scheduler(BlockManager(64, 4), budget=8)
    short, long = seq([1, 2, 3]), seq(list(range(1, 21)))
    sched.add(short)
    step = sched.schedule()
    assert step.chunks == [3] and step.samples == [True]
    run(step)
    sched.add(long)
    chunks = []
    while not long.output_ids:
        step = sched.schedule()
        # The running decode comes first and takes one token; the prompt gets what is left.
        assert step.seqs[0] is short and step.chunks[0] == 1
        assert step.num_tokens <= 8
        chunks.append(step.chunks[1])
        assert step.samples[1] == (long.num_cached + step.chunks[1] == len(long))
        run(step)
    assert chunks == [7, 7, 6] and long.num_cached == 20
    step = sched.schedule()
    assert step.chunks == [1, 1]  # both decode now


def test_admission_leaves_the_watermark_free():
    blocks = BlockManager(8, 4, watermark_blocks=2)
    assert blocks.can_allocate(seq(list(range(24))))  # 6 blocks, 2 left
    assert not blocks.can_allocate(seq(list(range(25))))  # 7 blocks, 1 left
    s = seq(list(range(24)))
    blocks.allocate(s)
    s.output_ids += [1]  # a running sequence may still grow into the watermark
    assert blocks.can_append(s)


def test_a_shared_prefix_is_computed_once_and_only_for_the_same_adapter():
    blocks = BlockManager(32, 4)
    prompt = list(range(100, 110))  # 2 full blocks and 2 tokens
    first = seq(prompt)
    blocks.allocate(first)
    assert first.num_cached == 0
    first.num_cached = len(first)
    blocks.commit(first)
    again = seq([*prompt, 5, 6])
    blocks.allocate(again)
    assert again.num_cached == 8 and again.block_table[:2] == first.block_table[:2]
    assert blocks.refs[first.block_table[0]] == 2
    # Another adapter, or the same prompt under an adapter, never sees the base's blocks.
    for other in (seq(prompt, entry("team-a")), seq(prompt, entry("team-b"))):
        blocks.allocate(other)
        assert other.num_cached == 0 and not set(other.block_table) & set(first.block_table)
    # One different first token: nothing is shared, though every later token matches.
    shifted = seq([0, *prompt[1:]])
    blocks.allocate(shifted)
    assert shifted.num_cached == 0


def test_a_prompt_of_exactly_cached_blocks_recomputes_its_last_block():
    blocks = BlockManager(32, 4)
    first = seq(list(range(8)))
    blocks.allocate(first)
    first.num_cached = 8
    blocks.commit(first)
    same = seq(list(range(8)))
    blocks.allocate(same)
    # The last token's logits are needed: its block is not shared, so recomputing it never
    # writes into a block the first sequence reads.
    assert same.num_cached == 4 and same.block_table[1] != first.block_table[1]


def test_freed_cached_blocks_are_found_again_until_reused():
    blocks = BlockManager(4, 4)
    first = seq(list(range(9)))
    blocks.allocate(first)
    first.num_cached = 9
    blocks.commit(first)
    blocks.deallocate(first)
    assert blocks.num_free == 4
    back = seq(list(range(9)))
    assert blocks.can_allocate(back)
    blocks.allocate(back)
    assert back.num_cached == 8 and blocks.num_free == 1
    blocks.deallocate(back)
    # Something else takes every block: the cached ones are overwritten and forgotten.
    other = seq(list(range(50, 66)))
    blocks.allocate(other)
    assert blocks.cached == {} and blocks.hash_of == {}
    blocks.deallocate(other)
    late = seq(list(range(9)))
    blocks.allocate(late)
    assert late.num_cached == 0


def test_a_sequence_frees_its_last_block_first():
    blocks = BlockManager(4, 4)
    s = seq(list(range(12)))
    blocks.allocate(s)
    table = list(s.block_table)
    blocks.deallocate(s)
    assert list(blocks.free)[-3:] == table[::-1]


async def test_chunked_prefill_and_cached_prefixes_answer_as_peft_does(demo_dir, tmp_path):
    """A step budget of 8 tokens cuts every prompt into chunks, prompts share prefixes (some
    under the same adapter, some not), and each answer still equals PEFT's own."""
    import asyncio

    import httpx
    from runtime_helpers import peft_greedy

    base, adapters = demo_dir
    stem = "the quick brown fox jumps over the lazy dog while the cat "
    prompts = [stem + "sleeps", stem + "watches", "SELECT name FROM users WHERE"]
    config = make_config(
        base,
        tmp_path,
        adapters={n: str(p) for n, p in adapters.items()},
        max_num_batched_tokens=8,
        max_running=4,
        kv_cache_tokens=2048,
    )
    models = ["tiny", "poet", "sql-expert"]
    with RunningServer(config) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

            async def one(model: str, prompt: str) -> str:
                body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0}
                r = await client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]

            first = await asyncio.gather(*(one(m, p) for m in models for p in prompts))
            again = await asyncio.gather(*(one(m, p) for m in models for p in prompts))
        blocks = server.runtime.engine.blocks
        assert blocks.hits > 0, "the repeated prompts found no cached prefix"
    assert again == first
    for i, model in enumerate(models):
        expected = peft_greedy(base, adapters.get(model), prompts, 6)
        got = first[i * len(prompts) : (i + 1) * len(prompts)]
        assert got == expected, f"{model}: ours {got} != PEFT {expected}"


def test_kv_cache_sizing_from_device_memory():
    from loraplane.runtime.kv_memory import kv_blocks_for_memory

    gib = 2**30
    # An 80 GiB card, 1 GiB held by another process and the CUDA context, 17 GiB of weights
    # and activations at peak, 0.9 utilization, 2 MiB blocks, 1 GiB reserve.
    blocks = kv_blocks_for_memory(
        total=80 * gib,
        free=61 * gib,
        reserved=18 * gib,
        peak=17 * gib,
        utilization=0.9,
        block_bytes=2 << 20,
        reserve=1 * gib,
    )
    assert blocks == int((72 * gib - 1 * gib - 17 * gib - 1 * gib) // (2 << 20))
    # Nothing left: zero blocks, never a negative count.
    none = kv_blocks_for_memory(
        total=gib, free=0, reserved=gib, peak=gib, utilization=0.5, block_bytes=1, reserve=0
    )
    assert none == 0


def test_cache_metrics_follow_the_block_manager():
    from prometheus_client import generate_latest

    from loraplane.runtime.metrics import Metrics
    from loraplane.runtime.tally import Tally

    metrics = Metrics()
    tally = Tally(metrics, "base")
    blocks = BlockManager(8, 4)
    first = seq(list(range(9)))
    blocks.allocate(first)
    first.num_cached = 9
    blocks.commit(first)
    second = seq(list(range(10)))
    blocks.allocate(second)  # 8 of its 10 tokens cached
    tally.cache(blocks, preemptions=2)
    tally.cache(blocks, preemptions=3)  # counters move by what changed, not by totals again
    text = generate_latest(metrics.registry).decode()
    assert "loraplane_kv_cache_usage_ratio 0.5" in text  # 3 + 1 of 8 blocks held
    assert "loraplane_prefix_cache_queried_tokens_total 19.0" in text
    assert "loraplane_prefix_cache_hit_tokens_total 8.0" in text
    assert "loraplane_preemptions_total 3.0" in text


def test_a_steps_tokens_are_streamed_while_the_next_step_runs(demo_dir, tmp_path, monkeypatch):
    """Launch, then send the previous step's tokens out, then wait: the host's work overlaps
    the device's. A stop string (found on the HTTP side) drops the tokens computed meanwhile."""
    import httpx
    from runtime_helpers import RunningServer, make_config

    base, adapters = demo_dir
    config = make_config(base, tmp_path, adapters={"poet": str(adapters["poet"])})
    with RunningServer(config) as server:
        engine, runner = server.runtime.engine, server.runtime.runner
        events: list[str] = []
        real_launch, real_sink = runner.launch, engine.sink

        def launch(seqs, slots, chunks=None):
            events.append("launch")
            return real_launch(seqs, slots, chunks)

        def sink(outputs):
            events.append("emit")
            return real_sink(outputs)

        monkeypatch.setattr(runner, "launch", launch)
        monkeypatch.setattr(engine, "sink", sink)
        body = {"model": "poet", "prompt": "hello", "max_tokens": 3, "ignore_eos": True}
        done = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        assert done["usage"]["completion_tokens"] == 3
        assert events == ["launch", "launch", "emit", "launch", "emit", "emit"]
    # A stop string completed by token k: the token computed while it was found is dropped.
    with RunningServer(make_config(base, tmp_path / "stop")) as server:
        gen = {"inputs": "hello", "parameters": {"max_new_tokens": 8, "details": True}}
        r = httpx.post(f"{server.url}/generate", json=gen, timeout=60).json()
        pieces = [t["text"] for t in r["details"]["tokens"]]
        k = next(
            i
            for i in range(1, len(pieces))
            if pieces[i].strip() and pieces[i] not in "".join(pieces[:i])
        )
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 8, "temperature": 0}
        cut = httpx.post(
            f"{server.url}/v1/completions", json=dict(body, stop=[pieces[k]]), timeout=60
        ).json()
    assert cut["choices"][0]["text"] == "".join(pieces[:k])
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] == k + 1


def test_the_profiling_step_stays_within_the_models_positions(demo_dir, tmp_path):
    # On a GPU the KV cache is sized after one step of the whole token budget; a budget above
    # max_position_embeddings (512 here) is cut into sequences the rotary tables cover.
    # Run here on the CPU, where the step is otherwise skipped: an index past the tables
    # raises an IndexError (on CUDA it was a device-side assert that killed the engine).
    from loraplane.runtime.model_runner import profile_sequence_lengths

    assert profile_sequence_lengths(1300, 512) == [512, 512, 276]
    assert profile_sequence_lengths(1024, 512) == [512, 512]
    assert profile_sequence_lengths(100, 512) == [100]
    base, _ = demo_dir
    runner = RunningServer(make_config(base, tmp_path, max_num_batched_tokens=1300)).runtime.runner
    assert runner.model.config.max_position_embeddings == 512
    runner._profile_forward(1300)
    # Its cache held every sequence's blocks: 32 + 32 + 18 of 16 tokens.
    assert runner.k_cache.shape[1] == (32 + 32 + 18) * runner.config.block_size + 2
