"""The only code that touches the device: model weights, KV cache, the LoRA weight bank, the
forward pass.

launch() queues a step and returns a PendingStep at once; the engine reads its tokens later,
after it has launched the next step (async scheduling). A sequence whose last token is still
on the device gets it as input from the previous launch's samples by a copy on the device
(sampler.take_tokens), into the flat input ids or the decode graph's token buffer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from loraplane.runtime.config import RuntimeConfig
from loraplane.runtime.cuda_graphs import DecodeGraphs, DecodeInputs, batch_buckets
from loraplane.runtime.kv_memory import graph_reserve_bytes, kv_blocks_for_memory
from loraplane.runtime.lora import AdapterWeights, LoraWeightBank, inject_lora
from loraplane.runtime.model import AttentionContext, CausalLM, load_model
from loraplane.runtime.model.loader import TORCH_DTYPES
from loraplane.runtime.sampler import Sampler, read_back, take_tokens
from loraplane.runtime.sequence import Sequence

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self, config: RuntimeConfig, model_dir: Path | None, model: CausalLM | None = None
    ) -> None:
        """model: an already built model on config's device and dtype (benchmarks build
        random-weight ones in place), instead of loading model_dir."""
        self.config = config
        self.device = torch.device(config.device)
        if model is None:
            assert model_dir is not None, "give a model directory or a model"
            model = load_model(model_dir, config.dtype, config.device)
        self.model: CausalLM = model
        mc = self.model.config
        targets = [t for t in config.lora_target_modules if self._has_linear(t)]
        self.lora: LoraWeightBank = inject_lora(
            self.model,
            targets,
            config.max_adapters,
            config.max_lora_rank,
            dtype=TORCH_DTYPES[config.dtype],
            device=self.device,
        )
        self.dtype = TORCH_DTYPES[config.dtype]
        self.paged = config.paged_attention
        self.kv_blocks = self._size_kv_cache()
        self._allocate_kv_cache(self.kv_blocks)
        # A sequence must fit the model, --max-model-len and the cache less the watermark
        # (admission keeps that free: a longer sequence could never start).
        self.watermark_blocks = int(config.kv_watermark * self.kv_blocks)
        self.max_seq_len = min(
            [
                mc.max_position_embeddings,
                (self.kv_blocks - self.watermark_blocks) * config.block_size,
            ]
            + ([config.max_model_len] if config.max_model_len else [])
        )
        self.decode_inputs: DecodeInputs | None = None
        self.graphs: DecodeGraphs | None = None
        if self.paged:
            self.decode_inputs = DecodeInputs(
                self.model,
                self.lora,
                config.max_running,
                -(-self.max_seq_len // config.block_size),
                config.block_size,
                self.scratch_kv_index,
                self.device,
            )
            if self.device.type == "cuda" and not config.enforce_eager:
                self.graphs = self._capture_graphs()
        log.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB)",
            self.kv_blocks,
            config.block_size,
            self.kv_blocks * config.block_size,
            self.kv_blocks * self.kv_block_bytes / 2**30,
        )
        self.sampler = Sampler(config.seed)
        # The last launch's choice ([2, sampled] on the device) and each sampled sequence's
        # row in it: where the next launch takes the pending tokens from.
        self.last_sampled: tuple[torch.Tensor, dict[int, int]] | None = None

    def _capture_graphs(self) -> DecodeGraphs | None:
        """Decode graphs, or None (eager steps) when capture fails: slower, never down."""
        assert self.decode_inputs is not None
        graphs = DecodeGraphs(self.decode_inputs, batch_buckets(self.config.max_running))
        try:
            graphs.capture()
        except Exception:
            log.exception(
                "capturing the decode CUDA graphs failed; decode steps run eagerly "
                "(slower). --enforce-eager skips the capture."
            )
            graphs.graphs.clear()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
            return None
        return graphs

    @property
    def kv_block_bytes(self) -> int:
        mc = self.model.config
        per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * self.dtype.itemsize
        return per_token * self.config.block_size

    def _allocate_kv_cache(self, blocks: int) -> None:
        mc = self.model.config
        kv_positions = blocks * self.config.block_size
        # Two positions past the blocks: one never written, whose zeros padded positions of
        # gathered attention read; one that padding rows of a decode graph write and nothing
        # reads.
        self.pad_kv_index = kv_positions
        self.scratch_kv_index = kv_positions + 1
        shape = (mc.num_layers, kv_positions + 2, mc.num_kv_heads, mc.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.model.attach_kv_cache(self.k_cache, self.v_cache, self.config.block_size)

    def _size_kv_cache(self) -> int:
        """KV blocks: as configured, or what free GPU memory holds after a profiling forward."""
        c = self.config
        if c.kv_cache_tokens is not None or self.device.type != "cuda":
            return -(-c.host_kv_cache_tokens() // c.block_size)
        # The largest step this runner will take, with every token through a LoRA slot, on a
        # cache just big enough for it: its peak is what activations need beside the weights.
        tokens = c.max_num_batched_tokens
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_forward(tokens)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        profile_cache = 2 * self.k_cache.numel() * self.dtype.itemsize
        del self.k_cache, self.v_cache
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        blocks = kv_blocks_for_memory(
            total=total,
            free=free,
            reserved=torch.cuda.memory_reserved(self.device),
            peak=peak - profile_cache,
            utilization=c.gpu_memory_utilization,
            block_bytes=self.kv_block_bytes,
            reserve=graph_reserve_bytes(self.model.config.vocab_size, c.max_running),
        )
        if blocks * c.block_size < c.block_size * 2:
            raise RuntimeError(
                f"no GPU memory is left for the KV cache: weights and a {tokens}-token step "
                f"use {peak / 2**30:.1f} GiB of {total / 2**30:.1f} GiB at "
                f"--gpu-memory-utilization {c.gpu_memory_utilization}; lower "
                "--max-num-batched-tokens or --max-adapters, or raise the utilization"
            )
        return blocks

    @torch.inference_mode()
    def _profile_forward(self, tokens: int) -> None:
        """One step of `tokens` prompt tokens, on a KV cache allocated just big enough for it.

        The step is cut into sequences no longer than the model takes: a budget above
        max_position_embeddings (a small model beside the default budget) would otherwise
        index past the rotary tables.
        """
        mc = self.model.config
        lens = profile_sequence_lengths(tokens, mc.max_position_embeddings)
        bs = self.config.block_size
        tables, next_block = [], 0
        for n in lens:
            tables.append(list(range(next_block, next_block + -(-n // bs))))
            next_block += len(tables[-1])
        self._allocate_kv_cache(next_block)
        ctx = AttentionContext.build(
            lens,
            lens,
            tables,
            self.config.block_size,
            mc.sliding_window,
            self.device,
            pad_kv_index=self.pad_kv_index,
            paged=self.paged,
        )
        # Logits of max_running rows, as a decode step of a full batch would take.
        rows = min(tokens, self.config.max_running)
        ctx.logits_index = torch.arange(tokens - rows, tokens, device=self.device)
        self.lora.set_batch(torch.zeros(tokens, dtype=torch.long))
        try:
            logits = self.model(torch.zeros(tokens, dtype=torch.long, device=self.device), ctx)
            torch.log_softmax(logits.float(), dim=-1)
        finally:
            self.lora.clear_batch()

    def _has_linear(self, short: str) -> bool:
        return any(
            name.rsplit(".", 1)[-1] == short and isinstance(m, torch.nn.Linear)
            for name, m in self.model.named_modules()
        )

    @property
    def lora_modules(self) -> set[str]:
        return set(self.lora.layers)

    @property
    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        return {p: (m.in_features, m.out_features) for p, m in self.lora.layers.items()}

    @property
    def linear_modules(self) -> set[str]:
        return set(self.lora.layers) | set(self.lora.other_linears)

    def load_adapter(self, lora_slot: int, weights: AdapterWeights) -> None:
        self.lora.load(lora_slot, weights)

    def clear_adapter(self, lora_slot: int) -> None:
        self.lora.clear(lora_slot)

    def run(
        self, seqs: list[Sequence], lora_slots: list[int], chunks: list[int] | None = None
    ) -> tuple[list[int], list[float]]:
        """launch(...).result(): one step, waited for."""
        return self.launch(seqs, lora_slots, chunks).result()

    @torch.inference_mode()
    def launch(
        self, seqs: list[Sequence], lora_slots: list[int], chunks: list[int] | None = None
    ) -> PendingStep:
        """Queue one forward over the next chunks[i] uncached tokens of each sequence (all of
        them when chunks is None) and the sampling of each sequence whose chunk reaches its
        last token. The others are mid-prompt: nothing is sampled for them (a seeded
        request's generator must not move). On a GPU this returns while the step runs.

        lora_slots: each sequence's LoRA slot, -1 for the base model alone.

        A sequence whose last token is pending (async scheduling: the previous launch samples
        it) has that token's id copied from the previous launch's samples on the device, so
        this step can be queued before the host has read them. Once queued, each sequence's
        num_cached counts its chunk: the stream writes that k/v before any later step reads it.
        """
        if chunks is None:
            chunks = [s.num_uncached for s in seqs]
        taken = self._taken(seqs, chunks)
        if (
            self.graphs is not None
            and all(c == 1 for c in chunks)
            and self.graphs.inputs.fits(seqs)
        ):
            logits = self.graphs.run(seqs, lora_slots, taken)
            return self._sample(seqs, logits, seqs, chunks)
        ids: list[int] = []
        token_slots: list[int] = []  # the LoRA slot of every token
        clens: list[int] = []
        last: list[int] = []  # row of each sequence that samples
        for i, (seq, lora_slot, chunk) in enumerate(zip(seqs, lora_slots, chunks, strict=True)):
            new = seq.uncached_tokens(chunk)
            assert len(new) == chunk, (seq.seq_id, len(new), chunk)
            ids += new
            token_slots += [lora_slot] * chunk
            clens.append(seq.num_cached + chunk)
            if clens[-1] == len(seq):
                last.append(i)
        ctx = AttentionContext.build(
            chunks,
            clens,
            [s.block_table for s in seqs],
            self.config.block_size,
            self.model.config.sliding_window,
            self.device,
            pad_kv_index=self.pad_kv_index,
            paged=self.paged,
        )
        ctx.logits_index = ctx.logits_index[last]
        self.lora.set_batch(torch.tensor(token_slots, dtype=torch.long))
        input_ids = torch.tensor(ids, device=self.device)
        if taken is not None:
            take_tokens(input_ids, *taken)
        try:
            logits = self.model(input_ids, ctx)
        finally:
            self.lora.clear_batch()
        return self._sample(seqs, logits, [seqs[i] for i in last], chunks)

    def _taken(
        self, seqs: list[Sequence], chunks: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(index, choice) for sampler.take_tokens: the flat input of each pending token this
        step computes, and its row in the previous launch's choice."""
        into: list[int] = []
        rows: list[int] = []
        start = 0
        for seq, chunk in zip(seqs, chunks, strict=True):
            start += chunk
            if seq.num_pending and seq.num_cached + chunk == len(seq):
                assert self.last_sampled is not None, f"no launch sampled seq {seq.seq_id}'s token"
                choice, row_of = self.last_sampled
                assert seq.seq_id in row_of, f"the last launch did not sample seq {seq.seq_id}"
                into.append(start - 1)
                rows.append(row_of[seq.seq_id])
        if not into:
            return None
        index = torch.tensor([into, rows], dtype=torch.long)
        if self.device.type == "cuda":  # from pinned memory the copy is queued, not waited for
            index = index.pin_memory()
        return index.to(self.device, non_blocking=True), choice

    def _sample(
        self,
        seqs: list[Sequence],
        logits: torch.Tensor,
        sampled: list[Sequence],
        chunks: list[int],
    ) -> PendingStep:
        # logits: [len(sampled), vocab]
        choice = None
        if sampled:
            choice = self.sampler.choose(
                logits, [s.seq_id for s in sampled], [s.params for s in sampled]
            )
        pending = PendingStep(choice)
        self.last_sampled = None
        if choice is not None:
            self.last_sampled = (choice, {s.seq_id: i for i, s in enumerate(sampled)})
        for seq, chunk in zip(seqs, chunks, strict=True):
            seq.num_cached += chunk
        return pending


class PendingStep:
    """A step queued on the device: its tokens, once result() has waited for them.

    The one device-to-host copy goes to page-locked memory without waiting, so the engine
    thread can go on (schedule and launch the next step, stream earlier tokens) meanwhile;
    result() waits on an event (the GIL is released while it does)."""

    def __init__(self, choice: torch.Tensor | None) -> None:
        self.host: torch.Tensor | None = None
        self.done: torch.cuda.Event | None = None
        if choice is not None:
            if choice.device.type == "cuda":
                self.host = torch.empty(choice.shape, dtype=choice.dtype, pin_memory=True)
                self.host.copy_(choice, non_blocking=True)
                self.done = torch.cuda.Event()
                self.done.record()
            else:
                self.host = choice

    def result(self) -> tuple[list[int], list[float]]:
        """The next token and its logprob of each sampled sequence, in order."""
        if self.host is None:
            return [], []
        if self.done is not None:
            self.done.synchronize()
        return read_back(self.host)


def profile_sequence_lengths(tokens: int, max_len: int) -> list[int]:
    """`tokens` cut into sequences of at most max_len (the last one shorter)."""
    full, rest = divmod(tokens, max_len)
    return [max_len] * full + ([rest] if rest else [])
