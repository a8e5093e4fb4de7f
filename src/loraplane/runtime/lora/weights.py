"""Plain state of one LoRA adapter as read from disk: per-module A, B and scaling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LoraModuleWeights:
    a: torch.Tensor  # [r, d_in]
    b: torch.Tensor  # [d_out, r]
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA

    def __post_init__(self) -> None:
        assert self.a.dim() == 2 and self.b.dim() == 2, (self.a.shape, self.b.shape)
        assert self.a.shape[0] == self.b.shape[1], (self.a.shape, self.b.shape)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class AdapterWeights:
    config: dict[str, Any]  # adapter_config.json as read
    # key: module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    modules: dict[str, LoraModuleWeights]
    rank: int  # max rank over modules
    target_modules: set[str] = field(default_factory=set)  # short names, e.g. {"q_proj"}
    size_bytes: int = 0
    base_model_name_or_path: str | None = None

    def pin(self) -> AdapterWeights:
        """This adapter in page-locked host memory: its copies into a GPU slot then run
        asynchronously (non_blocking), beside the forward, instead of stalling the step.
        Done once, where the host copy is read, never on the engine thread."""
        for module in self.modules.values():
            module.a = module.a.contiguous().pin_memory()
            module.b = module.b.contiguous().pin_memory()
        return self
