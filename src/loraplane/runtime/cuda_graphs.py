"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, with and without LoRA.

A decode step of an 8B model is a few thousand small kernels; launched one by one from Python
that is ~15-30 ms of host time against a few ms of GPU work. A graph launches them all at once.
A graph replays fixed addresses and shapes, so a step's inputs are copied into persistent
buffers (`DecodeInputs`), the batch is padded up to the next bucket, and nothing inside the
step may read a device value back on the host (rope tables are precomputed, attention is the
paged kernel, LoRA tiles are built on the device).

Padding rows attend to nothing (context length 0: the kernel writes zeros), write their k/v
to a scratch cache position that nothing reads, and have no adapter. Each bucket has a graph
without LoRA too: a batch with no adapter pays nothing for the LoRA path.

A decode token the host has not read back yet (async scheduling) is copied into the token row
on the device after the upload, from the previous step's samples: no sync between steps.

`DecodeInputs.forward` is the exact code a graph captures; on a CPU it runs eagerly, which is
how the padding and buffers are tested without a GPU.
"""

from __future__ import annotations

import logging
from array import array

import torch

from loraplane.runtime.lora import LoraWeightBank
from loraplane.runtime.model import AttentionContext, CausalLM
from loraplane.runtime.model.context import PagedMetadata
from loraplane.runtime.sampler import take_tokens
from loraplane.runtime.sequence import Sequence

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """Graph batch sizes: powers of two to 16, then every 16 (padding wastes < 16 rows)."""
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch, 16)) + [max_batch]


class DecodeInputs:
    """A decode step's persistent inputs, and the forward over the first `bucket` rows."""

    def __init__(
        self,
        model: CausalLM,
        lora: LoraWeightBank,
        max_batch: int,
        table_width: int,
        block_size: int,
        scratch_kv_index: int,
        device: torch.device,
    ) -> None:
        self.model, self.lora = model, lora
        self.max_batch, self.table_width, self.block_size = max_batch, table_width, block_size
        self.scratch_kv_index = scratch_kv_index
        self.device = device
        pin = device.type == "cuda"

        def buffers(*shape: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return host, torch.zeros(shape, dtype=dtype, device=device)

        # One row per input of a sequence: token, position, write index, context length, slot.
        self.host_rows, self.rows = buffers(5, max_batch, dtype=torch.long)
        self.host_tables, self.block_tables = buffers(max_batch, table_width, dtype=torch.int32)
        self.context_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.token_slots = torch.full((max_batch,), -1, dtype=torch.int32, device=device)
        self.logits_index = torch.arange(max_batch, device=device)
        self.no_prefill = torch.zeros(1, dtype=torch.int32, device=device)
        # The staging buffers above are page-locked and copied up without waiting. With async
        # scheduling the host fills step N+1 while the device may not have taken step N's
        # copy yet: this event, recorded behind each upload, is waited for before they are
        # written again. The copy is queued right behind the step the host has just read
        # back, so the wait is microseconds.
        self.uploaded: torch.cuda.Event | None = None
        self.pad(max_batch)

    def fits(self, seqs: list[Sequence]) -> bool:
        return len(seqs) <= self.max_batch and all(
            len(s.block_table) <= self.table_width for s in seqs
        )

    def pad(self, bucket: int) -> None:
        """Every row a padding row (what a graph is captured with)."""
        self._writable()
        self.host_rows.zero_()
        self.host_rows[2].fill_(self.scratch_kv_index)
        self.host_rows[4].fill_(-1)
        self.host_tables.zero_()
        self._upload(bucket)

    def fill(
        self,
        seqs: list[Sequence],
        lora_slots: list[int],
        bucket: int,
        taken: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """This step's rows, then padding up to bucket rows (one copy per buffer).

        taken: (index, choice) for the rows whose token is pending (sampler.take_tokens): the
        ids are copied on the device into the persistent token row, after the upload."""
        n, bs = len(seqs), self.block_size
        assert n <= bucket <= self.max_batch, (n, bucket)
        self._writable()
        # Flat arrays viewed as tensors: per-element tensor writes, or torch.tensor of nested
        # lists, cost more than the rest of a step's host work at 64 rows.
        pad = bucket - n
        positions = [s.num_cached for s in seqs]  # each sequence's one uncached token
        tables = [s.block_table for s in seqs]
        rows = array("q", [s.token_at(p) for s, p in zip(seqs, positions, strict=True)])
        rows.extend([0] * pad)
        rows.extend(positions)
        rows.extend([0] * pad)
        rows.extend([t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)])
        rows.extend([self.scratch_kv_index] * pad)
        rows.extend([p + 1 for p in positions])  # context lengths; a padding row's 0 reads nothing
        rows.extend([0] * pad)
        rows.extend(lora_slots)
        rows.extend([-1] * pad)
        self.host_rows[:, :bucket] = torch.frombuffer(rows, dtype=torch.long).view(5, bucket)
        # Entries past a table's end are never read (its context length stops the kernel),
        # and neither is any entry of a padding row: only the tables' own width is written.
        width = max((len(t) for t in tables), default=0)
        if width:
            flat = array("i")
            for t in tables:
                flat.extend(t)
                flat.extend([0] * (width - len(t)))
            self.host_tables[:n, :width] = torch.frombuffer(flat, dtype=torch.int32).view(n, width)
        self._upload(bucket)
        if taken is not None:
            take_tokens(self.rows[0], *taken)

    def _writable(self) -> None:
        if self.uploaded is not None:
            self.uploaded.synchronize()  # the last upload has left the staging buffers

    def _upload(self, bucket: int) -> None:
        self.rows[:, :bucket].copy_(self.host_rows[:, :bucket], non_blocking=True)
        self.block_tables[:bucket].copy_(self.host_tables[:bucket], non_blocking=True)
        if self.device.type == "cuda":
            self.uploaded = torch.cuda.Event()
            self.uploaded.record()
        # The int32 copies the kernels read, converted on the device.
        self.context_lens[:bucket].copy_(self.rows[3, :bucket])
        self.token_slots[:bucket].copy_(self.rows[4, :bucket])

    def forward(self, bucket: int, with_lora: bool) -> torch.Tensor:
        """[bucket, vocab] logits of the first bucket rows. Launches kernels only."""
        ctx = AttentionContext(
            positions=self.rows[1, :bucket],
            kv_write_index=self.rows[2, :bucket],
            logits_index=self.logits_index[:bucket],
            groups=[],
            paged=PagedMetadata(
                num_decodes=bucket,
                block_tables=self.block_tables[:bucket],
                context_lens=self.context_lens[:bucket],
                query_start_loc=self.no_prefill,
                max_query_len=0,
            ),
        )
        if with_lora:
            self.lora.set_batch(self.token_slots[:bucket], graph_safe=True)
        else:
            self.lora.clear_batch()
        try:
            return self.model(self.rows[0, :bucket], ctx)
        finally:
            self.lora.clear_batch()


class DecodeGraphs:
    """Captured decode graphs over one DecodeInputs, replayed by batch size."""

    def __init__(self, inputs: DecodeInputs, buckets: list[int]) -> None:
        self.inputs = inputs
        self.buckets = sorted(buckets)
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    @torch.inference_mode()
    def capture(self) -> None:
        # Largest first: smaller graphs then fit in the memory the pool already holds.
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            for with_lora in (False, True):
                self.inputs.pad(bucket)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks kernels
                    for _ in range(2):
                        self.inputs.forward(bucket, with_lora)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.inputs.forward(bucket, with_lora)
                self.graphs[(bucket, with_lora)] = (graph, logits)
        torch.cuda.synchronize()
        log.info("captured %d decode graphs for batch sizes %s", len(self.graphs), self.buckets)

    def run(
        self,
        seqs: list[Sequence],
        lora_slots: list[int],
        taken: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """[len(seqs), vocab] logits of one decode step (every sequence one uncached token)."""
        bucket = self.bucket(len(seqs))
        with_lora = any(slot >= 0 for slot in lora_slots)
        self.inputs.fill(seqs, lora_slots, bucket, taken)
        graph, logits = self.graphs[(bucket, with_lora)]
        graph.replay()
        return logits[: len(seqs)]
