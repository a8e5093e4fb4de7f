"""The engine's small parts on their own: blocks, scheduling fairness, preemption, sampling,
stop strings, attention metadata."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from loraplane.runtime.adapters.entry import AdapterEntry
from loraplane.runtime.adapters.host_tier import HostTier
from loraplane.runtime.block_manager import BlockManager
from loraplane.runtime.lora_slot_manager import LoraSlotManager
from loraplane.runtime.model.context import AttentionContext
from loraplane.runtime.sampler import Sampler
from loraplane.runtime.sampling import SamplingParams
from loraplane.runtime.scheduler import Scheduler
from loraplane.runtime.sequence import Sequence


def entry(name: str) -> AdapterEntry:
    e = AdapterEntry(name, "src", None, None, "", Path("/x"), 1, [], 0)
    e.weights = object()  # type: ignore[assignment]  # a host copy, never read here
    return e


class NoRegistry:
    """A registry with nothing to place or free: only requests' adapters take slots."""

    def unplaced(self) -> list[AdapterEntry]:
        return []

    def reap(self) -> list[AdapterEntry]:
        return []


def scheduler(blocks: BlockManager, lora_slots: int, **limits: int) -> Scheduler:
    host = HostTier(threading.RLock(), 4, lambda: None)
    return Scheduler(blocks, LoraSlotManager(lora_slots, host), NoRegistry(), **limits)


def seq(n: int, adapter=None, max_tokens: int = 4) -> Sequence:
    return Sequence(list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), adapter)


def test_block_manager_allocates_appends_and_frees():
    blocks = BlockManager(num_blocks=4, block_size=4)
    s = seq(5)
    assert blocks.can_allocate(s)
    blocks.allocate(s)
    assert len(s.block_table) == 2 and blocks.num_free == 2
    s.output_ids += [7, 7, 7, 7]  # 9 tokens: a third block is needed
    assert blocks.can_append(s)
    blocks.append(s)
    assert len(s.block_table) == 3
    assert not blocks.can_allocate(seq(8))
    blocks.deallocate(s)
    assert blocks.num_free == 4 and s.block_table == [] and s.num_cached == 0


def test_admission_is_round_robin_across_adapters():
    a, b, c = entry("a"), entry("b"), entry("c")
    sched = scheduler(BlockManager(64, 4), 3, max_num_batched_tokens=1000, max_running=4)
    for _ in range(10):
        sched.add(seq(3, a))  # a burst for one adapter...
    sched.add(seq(3, b))
    sched.add(seq(3, c))
    sched.add(seq(3, None))
    step = sched.schedule()
    # ...does not keep the others out: one of each is admitted first.
    assert sorted(s.adapter_key for s in step.seqs) == ["", "a", "b", "c"]
    slots = dict(zip([s.adapter_key for s in step.seqs], step.lora_slots, strict=True))
    assert slots == {"": -1, "a": 0, "b": 1, "c": 2}
    assert {e.name for _, e in step.loads} == {"a", "b", "c"}


def test_an_adapter_without_a_slot_waits_without_blocking_others():
    a, b = entry("a"), entry("b")
    sched = scheduler(BlockManager(64, 4), 1, max_num_batched_tokens=1000, max_running=8)
    sched.add(seq(3, a))
    sched.add(seq(3, b))
    sched.add(seq(3, None))
    step = sched.schedule()
    assert sorted(s.adapter_key for s in step.seqs) == ["", "a"]
    assert sched.num_waiting == 1


def test_an_adapter_waiting_for_a_slot_gets_one_under_steady_load_of_another():
    a, b = entry("a"), entry("b")
    sched = scheduler(BlockManager(256, 4), 1, max_num_batched_tokens=1000, max_running=8)
    sched.add(seq(3, a, max_tokens=3))
    sched.add(seq(3, b, max_tokens=3))
    steps = 0
    while steps < 20:
        steps += 1
        sched.add(seq(3, a, max_tokens=3))  # a's requests always overlap one another
        step = sched.schedule()
        if any(s.adapter is b for s in step.seqs):
            break
        for s in step.seqs:
            s.num_cached = len(s)
            s.output_ids.append(9)
        for s in [s for s in sched.running if len(s.output_ids) >= 3]:
            sched.remove(s)
    # Two steps to finish a's running requests, then b takes the slot.
    assert any(s.adapter is b for s in step.seqs), "b never got the slot while a kept it busy"
    assert steps <= 5 and b.lora_slot == 0 and a.lora_slot is None, steps


def test_the_scheduler_alone_places_registered_adapters_and_frees_retired_ones():
    fresh, pinned, old = entry("fresh"), entry("pinned"), entry("old")
    pinned.pinned = True

    class Registry:
        unplaced_now: list[AdapterEntry] = [fresh]
        reaped: list[AdapterEntry] = []

        def unplaced(self) -> list[AdapterEntry]:
            return [e for e in self.unplaced_now if e.lora_slot is None]

        def reap(self) -> list[AdapterEntry]:
            done, self.reaped = self.reaped, []
            return done

    registry = Registry()
    host = HostTier(threading.RLock(), 4, lambda: None)
    sched = Scheduler(BlockManager(64, 4), LoraSlotManager(2, host), registry, 1000, 8)
    sched.add(seq(3, old))
    step = sched.schedule()  # a registered adapter takes a free slot with no request for it
    assert step.loads == [(0, fresh), (1, old)] and not step.clears
    for s in step.seqs:
        sched.remove(s)
    registry.unplaced_now = [pinned, fresh]
    step = sched.schedule()  # a pinned one evicts the least recently used idle holder
    assert step.loads == [(0, pinned)] and fresh.lora_slot is None
    registry.reaped = [old]  # retired: its slot is cleared, then handed out in the same step
    step = sched.schedule()
    assert step.clears == [1] and step.loads == [(1, fresh)]


def test_token_budget_and_preemption_under_cache_pressure():
    sched = scheduler(BlockManager(4, 4), 1, max_num_batched_tokens=10, max_running=8)
    # Within one adapter the queue is FIFO; third is another adapter's, so it can go ahead.
    first, second, third = seq(8), seq(8), seq(2, entry("a"))
    for s in (first, second, third):
        sched.add(s)
    step = sched.schedule()
    assert step.seqs == [first, third]  # no blocks for second: first and third hold 3 of 4
    for s in step.seqs:
        s.num_cached = len(s)
        s.output_ids.append(9)
    step = sched.schedule()
    # first needs a third block, second needs two more: the cache has one left.
    assert first in step.seqs and second not in step.seqs
    for s in step.seqs:
        s.num_cached = len(s)
        s.output_ids += [9, 9, 9, 9]  # first grows into another block; third too
    step = sched.schedule()
    assert third not in step.seqs and third.block_table == [] and third.num_cached == 0
    assert sched.waiting["a"][0] is third  # preempted to the front, to be recomputed


def test_sampler_greedy_top_k_top_p_and_seeds():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [0.0, 5.0, 1.0, 4.9]])
    sampler = Sampler(seed=0)
    greedy = SamplingParams(temperature=0.0)
    tokens, logprobs = sampler(logits, [1, 2], [greedy, greedy])
    assert tokens == [1, 1] and logprobs[0] == pytest.approx(float(logits[0].log_softmax(0)[1]))
    top1 = SamplingParams(temperature=1.0, top_k=1)
    assert sampler(logits, [3, 4], [top1, top1])[0] == [1, 1]
    nucleus = SamplingParams(temperature=1.0, top_p=0.5, seed=3)
    seen = {sampler(logits[:1], [10 + i], [nucleus])[0][0] for i in range(20)}
    assert seen == {1}  # token 1 alone holds half the mass
    wide = SamplingParams(temperature=2.0, top_k=2, seed=11)
    runs = [[sampler(logits[:1], [100 + r], [wide])[0][0] for _ in range(12)] for r in range(2)]
    assert runs[0] == runs[1] and set(runs[0]) <= {1, 3}
    sampler.forget(100)
    # A temperature that overflows the scaled logits still samples: the top token.
    for t in (1e-38, 1e-44):
        cold = SamplingParams(temperature=t, seed=1)
        assert sampler(logits, [200, 201], [cold, cold])[0] == [1, 1]


def test_sampling_params_are_checked():
    for bad in (
        {"max_tokens": 0},
        {"temperature": -1},
        {"top_p": 0},
        {"top_k": -1},
        {"stop": ("",)},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_attention_context_for_mixed_prefill_and_decode():
    ctx = AttentionContext.build([3, 1], [3, 6], [[0], [1, 2]], block_size=4)
    assert ctx.positions.tolist() == [0, 1, 2, 5]
    assert ctx.kv_write_index.tolist() == [0, 1, 2, 9]
    assert ctx.logits_index.tolist() == [2, 3]
    decode, prefill = ctx.groups  # decodes are never padded to a prefill's length
    assert decode.q_index.shape == (1, 1) and decode.token_index.tolist() == [3]
    assert decode.kv_index[0].tolist() == [4, 5, 6, 7, 8, 9]
    assert decode.mask[0, 0, 0].tolist() == [True] * 6
    assert prefill.token_index.tolist() == [0, 1, 2]
    assert prefill.mask[0, 0].tolist() == [
        [True, False, False],
        [True, True, False],
        [True, True, True],
    ]
    windowed = AttentionContext.build([1], [6], [[0, 1]], block_size=4, sliding_window=2)
    assert windowed.groups[0].mask[0, 0, 0].tolist() == [False] * 4 + [True, True]


def test_base_model_names_match_across_spellings():
    from loraplane.runtime.adapters.validation import base_matches

    ours = {"llama", "hf://meta-llama/Llama-3-8B@main", "/models/llama"}
    assert base_matches("meta-llama/Llama-3-8B", ours)
    assert base_matches("/mnt/other/copy/Llama-3-8B/", ours)
    assert base_matches(None, ours) and base_matches("anything", set())
    assert not base_matches("mistralai/Mistral-7B", ours)
