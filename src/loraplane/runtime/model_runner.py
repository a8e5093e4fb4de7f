"""The only code that touches the device: model weights, KV cache, the LoRA weight bank, the
forward pass."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from loraplane.runtime.config import RuntimeConfig
from loraplane.runtime.lora import AdapterWeights, LoraWeightBank, inject_lora
from loraplane.runtime.model import AttentionContext, CausalLM, load_model
from loraplane.runtime.model.loader import TORCH_DTYPES
from loraplane.runtime.sampler import Sampler
from loraplane.runtime.sequence import Sequence

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: RuntimeConfig, model_dir: Path) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.model: CausalLM = load_model(model_dir, config.dtype, config.device)
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
        kv_positions = config.kv_cache_blocks * config.block_size
        # One position past the blocks is never written: padded positions read its zeros.
        self.pad_kv_index = kv_positions
        shape = (mc.num_layers, kv_positions + 1, mc.num_kv_heads, mc.head_dim)
        dtype = TORCH_DTYPES[config.dtype]
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.model.attach_kv_cache(self.k_cache, self.v_cache)
        self.sampler = Sampler(config.seed)

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

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], lora_slots: list[int]) -> tuple[list[int], list[float]]:
        """One forward over every sequence's uncached tokens; next token and logprob of each.

        lora_slots: each sequence's LoRA slot, -1 for the base model alone.
        """
        ids: list[int] = []
        token_slots: list[int] = []  # the LoRA slot of every token
        qlens, clens = [], []
        for seq, lora_slot in zip(seqs, lora_slots, strict=True):
            new = seq.uncached_tokens()
            ids += new
            token_slots += [lora_slot] * len(new)
            qlens.append(len(new))
            clens.append(len(seq))
        ctx = AttentionContext.build(
            qlens,
            clens,
            [s.block_table for s in seqs],
            self.config.block_size,
            self.model.config.sliding_window,
            self.device,
            pad_kv_index=self.pad_kv_index,
        )
        self.lora.set_batch(torch.tensor(token_slots, dtype=torch.long))
        try:
            logits = self.model(torch.tensor(ids, device=self.device), ctx)
        finally:
            self.lora.clear_batch()
        for seq in seqs:
            seq.num_cached = len(seq)
        return self.sampler(logits, [s.seq_id for s in seqs], [s.params for s in seqs])
