"""Async scheduling: step N+1 is launched before step N's tokens are read, and nothing a client
sees changes. The pieces on their own (pending tokens, prefix hashes, the device-side copy),
then the whole engine in both modes against each other."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from runtime_helpers import RunningServer, make_config
from test_scheduling import scheduler, seq

from loraplane.runtime.block_manager import BlockManager
from loraplane.runtime.sampler import FAILED, take_tokens
from loraplane.runtime.sampling import SamplingParams
from loraplane.runtime.sequence import PLACEHOLDER, Sequence

# -- the pieces -----------------------------------------------------------------------------


def test_a_pending_token_counts_in_length_but_not_in_the_known_tokens():
    s = Sequence([1, 2, 3], SamplingParams(max_tokens=4))
    s.output_ids, s.num_cached, s.num_pending = [4], 4, 1
    assert len(s) == 5 and s.tokens == [1, 2, 3, 4]
    assert s.uncached_tokens() == [PLACEHOLDER] and s.token_at(4) == PLACEHOLDER
    assert s.room(max_seq_len=100) == 2  # 4 tokens at most: one out, one pending
    s.num_cached = 0  # preempted: recomputed with the pending token last
    assert s.uncached_tokens() == [1, 2, 3, 4, PLACEHOLDER]
    assert s.uncached_tokens(3) == [1, 2, 3]


def test_prefix_cache_hashes_only_blocks_whose_tokens_the_host_knows():
    blocks = BlockManager(8, 4)
    s = seq([1, 2, 3, 4, 5, 6, 7])
    blocks.allocate(s)
    s.num_cached, s.num_pending = 8, 1  # the pending token fills the second block
    blocks.commit(s)
    assert s.num_committed == 1
    s.output_ids, s.num_pending = [8], 0
    blocks.commit(s, computed=7)  # a step still running computed the eighth
    assert s.num_committed == 1
    blocks.commit(s)
    assert s.num_committed == 2


def test_a_sequence_whose_pending_token_is_its_last_is_not_scheduled_again():
    sched = scheduler(BlockManager(16, 4), budget=8)
    last, more = seq([1, 2, 3]), seq([4, 5, 6])
    last.params = SamplingParams(max_tokens=1)
    for s in (last, more):
        sched.add(s)
    step = sched.schedule()
    for s, chunk in zip(step.seqs, step.chunks, strict=True):
        s.num_cached += chunk  # launched
    more.num_pending = 1  # its token is not read yet; last's is its last: not pending
    step = sched.schedule()
    assert step.seqs == [more] and step.chunks == [1]
    assert len(more.block_table) == 1 and last in sched.running


def test_take_tokens_copies_sampled_ids_on_the_device_and_a_failed_one_as_zero():
    choice = torch.tensor([[11.0, FAILED, 13.0], [-0.1, float("nan"), -0.3]], dtype=torch.float64)
    ids = torch.tensor([5, PLACEHOLDER, 6, PLACEHOLDER, PLACEHOLDER])
    take_tokens(ids, torch.tensor([[1, 3, 4], [2, 0, 1]]), choice)
    assert ids.tolist() == [5, 13, 6, 11, 0]


# -- the whole engine, async against sync -------------------------------------------------------

PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7], [42]]
MODELS = ["tiny", "poet", "sql-expert"]


def jobs(max_tokens: int = 12) -> list[dict]:
    """Every model and prompt, greedy and seeded, some stopping early by max_tokens."""
    out = []
    for i, (model, prompt) in enumerate((m, p) for m in MODELS for p in PROMPTS):
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens - i % 4}
        body |= {"temperature": 0} if i % 2 else {"temperature": 0.9, "seed": 100 + i}
        out.append(body)
    return out


def answers(server: RunningServer, bodies: list[dict]) -> list[tuple]:
    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    out = []
    for r in asyncio.run(all_at_once()):
        if r.status_code != 200:
            out.append(("error", r.status_code, r.json()["error"]["message"][:80]))
            continue
        choice = r.json()["choices"][0]
        out.append(
            (choice["text"], choice["finish_reason"], r.json()["usage"]["completion_tokens"])
        )
    return out


class Recorder:
    """Wraps runner.launch: the order of launches and result reads, and each step's rows."""

    def __init__(self, runner) -> None:
        self.real = runner.launch
        self.events: list[tuple[str, int]] = []
        self.rows: list[list[tuple[list[int], int]]] = []  # per launch: (prompt, outputs known)

    def launch(self, seqs, slots, chunks=None):
        n = len(self.rows)
        self.rows.append([(s.prompt_ids, len(s.output_ids)) for s in seqs])
        self.events.append(("launch", n))
        try:
            pending = self.real(seqs, slots, chunks)
        except Exception:
            self.events.append(("raised", n))  # the engine falls back to one by one: not here
            raise
        real_result = pending.result

        def result():
            self.events.append(("result", n))
            return real_result()

        pending.result = result
        return pending


def serve(demo_dir, tmp_path, async_scheduling: bool, **overrides) -> RunningServer:
    base, adapters = demo_dir
    config = make_config(
        base,
        tmp_path / f"async-{async_scheduling}",
        adapters={n: str(p) for n, p in adapters.items()},
        async_scheduling=async_scheduling,
        **overrides,
    )
    return RunningServer(config)


def both_modes(demo_dir, tmp_path, bodies, setup=lambda server: None, **overrides):
    """answers() in sync then async mode, and each mode's Recorder."""
    results = []
    for mode in (False, True):
        server = serve(demo_dir, tmp_path, mode, **overrides)
        recorder = Recorder(server.runtime.runner)
        server.runtime.runner.launch = recorder.launch
        with server:
            setup(server)
            results.append((answers(server, bodies), recorder, server))
        assert not [e for e in recorder.events if e[0] == "raised"], recorder.events
    return results


def test_async_answers_as_sync_with_mixed_adapters_seeds_and_chunked_prefill(demo_dir, tmp_path):
    bodies = jobs()
    (sync, sync_rec, _), (fast, fast_rec, _) = both_modes(
        demo_dir, tmp_path, bodies, max_num_batched_tokens=8, max_running=8, kv_cache_tokens=1024
    )
    assert fast == sync
    assert all(a[0] != "error" for a in fast), fast
    # Sync: each step's tokens are read before the next is launched. Async: step N+1 was on
    # the device before N's tokens were read, whenever there was a step N+1 to run.
    sync_order = {e: i for i, e in enumerate(sync_rec.events)}
    for n in range(len(sync_rec.rows) - 1):
        assert sync_order[("result", n)] < sync_order[("launch", n + 1)], sync_rec.events
    order = {e: i for i, e in enumerate(fast_rec.events)}
    ahead = [
        n for n in range(len(fast_rec.rows) - 1) if order[("launch", n + 1)] < order[("result", n)]
    ]
    assert len(ahead) >= len(fast_rec.rows) // 2, fast_rec.events


def test_async_answers_as_sync_under_preemption(demo_dir, tmp_path):
    bodies = [
        {"model": m, "prompt": p, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
        for m, p in zip([*MODELS, "tiny"], PROMPTS, strict=True)
    ]
    bodies[1] |= {"temperature": 0.8, "seed": 7}
    results = both_modes(demo_dir, tmp_path, bodies, kv_cache_tokens=128, max_running=4)
    (sync, _, sync_server), (fast, _, fast_server) = results
    assert fast == sync
    assert all(a[1] == "length" and a[2] == 40 for a in fast), fast
    assert sync_server.runtime.engine.scheduler.preemptions > 0
    assert fast_server.runtime.engine.scheduler.preemptions > 0


@pytest.mark.parametrize("what", ["eos", "failed"])
def test_a_sequence_ended_mid_batch_drops_the_token_computed_meanwhile(demo_dir, tmp_path, what):
    """EOS, or a FAILED token, at one sequence's 4th token: in async mode its next step was
    already launched with that token as input; the token it computed is never sent or
    counted, and its neighbours answer as in sync mode."""
    bodies = [
        {"model": m, "prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": i != 0}
        for i, (m, p) in enumerate(zip(MODELS, PROMPTS, strict=False))
    ]
    victim = PROMPTS[0]

    def setup(server):
        engine, runner = server.runtime.engine, server.runtime.runner
        if what == "eos":
            # Whatever the victim's 4th token is becomes EOS (and only for the victim's step).
            real_accept = engine.post.accept

            def accept(s, token):
                if s.prompt_ids == victim and len(s.output_ids) == 3:
                    engine.post.eos_ids.add(token)
                    try:
                        return real_accept(s, token)
                    finally:
                        engine.post.eos_ids.discard(token)
                return real_accept(s, token)

            engine.post.accept = accept
        else:
            real_choose = runner.sampler.choose

            def choose(logits, seq_ids, params):
                choice = real_choose(logits, seq_ids, params)
                for row, seq_id in enumerate(seq_ids):
                    s = next((s for s in engine.scheduler.running if s.seq_id == seq_id), None)
                    if s is not None and s.prompt_ids == victim and len(s) - len(victim) == 3:
                        choice[0, row] = FAILED  # the 4th token: pending ones count in len(s)
                return choice

            runner.sampler.choose = choose

    results = both_modes(demo_dir, tmp_path, bodies, setup=setup)
    (sync, sync_rec, sync_server), (fast, fast_rec, fast_server) = results
    assert fast == sync
    if what == "eos":
        assert fast[0][1] == "stop" and fast[0][2] == 3, fast[0]
    else:
        assert fast[0][:2] == ("error", 500), fast[0]
    assert all(a[1] == "length" for a in fast[1:]), fast

    def victim_rows(rec):
        return [known for rows in rec.rows for prompt, known in rows if prompt == victim]

    # Sync never ran the victim past its 4th token; async launched it once more.
    assert max(victim_rows(sync_rec)) == 3
    assert (
        victim_rows(fast_rec).count(3) == 1
        and len(victim_rows(fast_rec)) == len(victim_rows(sync_rec)) + 1
    ), (victim_rows(sync_rec), victim_rows(fast_rec))
    # Counted as in sync mode: the token computed after the end never is.
    counted = [
        server.runtime.metrics.generated.labels(adapter="tiny")._value.get()
        for server in (sync_server, fast_server)
    ]
    assert counted[0] == counted[1] > 0, counted
