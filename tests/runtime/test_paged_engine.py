"""The GPU's engine path on a CPU: paged Triton attention (under the interpreter) for chunked
prefills and decodes, and decode steps through the persistent, padded inputs a CUDA graph
captures, each answer held to PEFT's own."""

from __future__ import annotations

import asyncio
import os
import sys
import traceback

import httpx
import torch
from runtime_helpers import RunningServer, make_config, peft_greedy
from torch.utils._python_dispatch import TorchDispatchMode

from loraplane.runtime.cuda_graphs import DecodeGraphs, DecodeInputs, batch_buckets

aten = torch.ops.aten
# Ops whose result the host needs before it can go on: on a GPU, a sync, which stream capture
# refuses (the capture fails, and decode steps run eagerly). lift_fresh is torch.tensor() of
# host data: a copy from pageable memory, which capture refuses too.
HOST_READS = {
    aten._local_scalar_dense.default,  # .item(), int(t), bool(t), `if t:`
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.lift_fresh.default,
}
TRITON = os.sep + "triton" + os.sep


class HostReads(TorchDispatchMode):
    """Records what, in the code a CUDA graph captures, would read the device from the host.

    The Triton interpreter's own tensor handling (it runs kernels on host copies) is not the
    captured code and is skipped; our launchers, which run on the host in a graph too, are not.
    """

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def _record(self, what: str) -> None:
        frame = sys._getframe(2)
        while frame is not None:
            if TRITON in frame.f_code.co_filename:
                return
            frame = frame.f_back
        where = "".join(traceback.format_stack(limit=6)[:-2])
        self.found.append(f"{what}\n{where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            self._record(str(func))
        elif func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        ):
            self._record("boolean-mask indexing (a data-dependent shape)")
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self._record("repeat_interleave without output_size")
        return func(*args, **kwargs)

    def __enter__(self):
        # Not dispatched on a CPU tensor, and a device-to-host copy on a GPU one.
        self._tolist = torch.Tensor.tolist
        mode = self

        def tolist(t):
            mode._record("Tensor.tolist")
            return mode._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


PROMPTS = ["the quick brown fox jumps over", "SELECT name FROM users", "hello"]
MODELS = ["tiny", "poet", "sql-expert"]
MAX_TOKENS = 5


class EagerGraphs(DecodeGraphs):
    """DecodeGraphs that run the code a graph would capture, eagerly: no GPU needed. It also
    records anything in that code that would read the device from the host."""

    def __init__(self, inputs: DecodeInputs, buckets: list[int]) -> None:
        super().__init__(inputs, buckets)
        self.replays: list[tuple[int, int, bool]] = []
        self.host_reads: list[str] = []

    def run(self, seqs, lora_slots, taken=None):
        bucket = self.bucket(len(seqs))
        with_lora = any(s >= 0 for s in lora_slots)
        self.inputs.fill(seqs, lora_slots, bucket, taken)
        self.replays.append((len(seqs), bucket, with_lora))
        with HostReads() as reads:
            logits = self.inputs.forward(bucket, with_lora)
        self.host_reads += reads.found
        return logits[: len(seqs)]


async def answers(server: RunningServer) -> list[str]:
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:

        async def one(model: str, prompt: str) -> str:
            body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        return await asyncio.gather(*(one(m, p) for m in MODELS for p in PROMPTS))


def expect_peft(demo_dir, got: list[str]) -> None:
    base, adapters = demo_dir
    for i, model in enumerate(MODELS):
        expected = peft_greedy(base, adapters.get(model), PROMPTS, MAX_TOKENS)
        ours = got[i * len(PROMPTS) : (i + 1) * len(PROMPTS)]
        assert ours == expected, f"{model}: ours {ours} != PEFT {expected}"


def paged_config(demo_dir, tmp_path, **overrides):
    base, adapters = demo_dir
    settings = dict(
        adapters={n: str(p) for n, p in adapters.items()},
        attention_backend="triton",
        max_running=8,
        kv_cache_tokens=1024,
    )
    return make_config(base, tmp_path, **(settings | overrides))


def test_paged_attention_with_chunked_prefill_answers_as_peft_does(demo_dir, tmp_path):
    # An 8-token budget: prompts are prefilled in chunks beside running decodes.
    config = paged_config(demo_dir, tmp_path, max_num_batched_tokens=8)
    with RunningServer(config) as server:
        assert server.runtime.runner.paged and server.runtime.runner.graphs is None
        got = asyncio.run(answers(server))
    expect_peft(demo_dir, got)


def test_decode_through_graph_inputs_answers_as_peft_does(demo_dir, tmp_path):
    # 9 requests, 6 at a time: the last 3 decode padded to the bucket of 4.
    config = paged_config(demo_dir, tmp_path, max_running=6)
    server = RunningServer(config)
    runner = server.runtime.runner
    assert runner.decode_inputs is not None
    graphs = EagerGraphs(runner.decode_inputs, batch_buckets(config.max_running))
    runner.graphs = graphs
    with server:
        got = asyncio.run(answers(server))
    expect_peft(demo_dir, got)
    # Decodes went through the padded inputs, mixed batches with and without adapters.
    assert any(n < bucket for n, bucket, _ in graphs.replays), graphs.replays
    assert any(lora for *_, lora in graphs.replays), graphs.replays
    # And the code a graph captures never waited on the device.
    assert not graphs.host_reads, "\n".join(graphs.host_reads[:3])


def test_host_reads_are_caught():
    # The check above can fail: each kind of host read, and none from the interpreter.
    x = torch.arange(6)
    with HostReads() as reads:
        int(x.max())
        x[x > 2]
        torch.tensor([1, 2])
        x.tolist()
        x.repeat_interleave(x)
        torch.where(x > 2, x, 0)  # no read: stays on the device
    assert [r.split("\n")[0] for r in reads.found] == [
        "aten._local_scalar_dense.default",
        "boolean-mask indexing (a data-dependent shape)",
        "aten.lift_fresh.default",
        "Tensor.tolist",
        "repeat_interleave without output_size",
    ]


def test_graph_inputs_pad_rows_that_attend_to_nothing(demo_dir, tmp_path):
    server = RunningServer(paged_config(demo_dir, tmp_path))
    runner = server.runtime.runner
    inputs = runner.decode_inputs
    assert inputs is not None
    before = runner.k_cache[:, : runner.pad_kv_index].clone()
    inputs.pad(4)
    logits = inputs.forward(4, with_lora=False)
    assert torch.isfinite(logits).all()
    # Padding wrote only the scratch position: no block, and not the zeros padding reads.
    assert torch.equal(runner.k_cache[:, : runner.pad_kv_index], before)
    assert not runner.k_cache[:, runner.pad_kv_index].any()


def test_batch_buckets_cover_every_size():
    for max_batch in (1, 3, 8, 16, 64, 100):
        buckets = batch_buckets(max_batch)
        assert buckets == sorted(set(buckets)) and buckets[-1] == max_batch
        for n in range(1, max_batch + 1):
            b = next(b for b in buckets if b >= n)
            assert b - n < 16


def test_attention_metadata_matches_a_per_token_computation():
    import random

    from loraplane.runtime.model.context import AttentionContext

    rng = random.Random(0)
    bs = 4
    for _ in range(50):
        n = rng.randrange(1, 9)
        decodes = rng.randrange(0, n + 1)
        qlens = [1] * decodes + [rng.randrange(1, 12) for _ in range(n - decodes)]
        clens = [q + rng.randrange(0, 20) for q in qlens]
        tables = [rng.sample(range(200), -(-c // bs) + rng.randrange(0, 3)) for c in clens]
        ctx = AttentionContext.build(qlens, clens, tables, bs, paged=True)
        want_pos, want_writes = [], []
        for q, c, table in zip(qlens, clens, tables, strict=True):
            for p in range(c - q, c):
                want_pos.append(p)
                want_writes.append(table[p // bs] * bs + p % bs)
        assert ctx.positions.tolist() == want_pos
        assert ctx.kv_write_index.tolist() == want_writes
        meta = ctx.paged
        while decodes < n and qlens[decodes] == 1:  # a one-token chunk decodes too
            decodes += 1
        assert meta is not None and meta.num_decodes == decodes
        for row, table in enumerate(tables):
            assert meta.block_tables[row, : len(table)].tolist() == table
        prefill = qlens[decodes:]
        assert meta.query_start_loc.tolist() == [sum(prefill[:i]) for i in range(len(prefill) + 1)]
        assert meta.max_query_len == max(prefill, default=0)
        assert ctx.logits_index.tolist() == [sum(qlens[: i + 1]) - 1 for i in range(n)]


def test_a_failed_graph_capture_leaves_eager_decode_steps(demo_dir, tmp_path, monkeypatch, caplog):
    server = RunningServer(paged_config(demo_dir, tmp_path))
    runner = server.runtime.runner

    def broken(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeGraphs, "capture", broken)
    assert runner._capture_graphs() is None
    assert "decode steps run eagerly" in caplog.text
