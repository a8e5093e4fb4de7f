"""Shared runtime test setup: the Triton interpreter on CPU-only machines, tiny LoRA fixtures."""

from __future__ import annotations

import os

import torch

# Triton reads this when it is first imported (importing torch does not import it), so it
# must be set before any test module imports the kernels. Only where no GPU exists: on a GPU
# machine the kernels run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest

from loraplane.testing.tiny import (
    ALL_TARGETS,
    TinyAdapterSpec,
    TinyModelSpec,
    build_adapter,
    build_model,
)

# Adapters that differ in every way the slots must honour: rank, alpha, targets (attention
# and MLP), rsLoRA, rank_pattern and alpha_pattern.
LORA_MIX: dict[str, TinyAdapterSpec] = {
    "qv8": TinyAdapterSpec(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), seed=21),
    "all16": TinyAdapterSpec(r=16, lora_alpha=8, target_modules=ALL_TARGETS, seed=22),
    "rs4": TinyAdapterSpec(
        r=4, lora_alpha=8, target_modules=("o_proj", "down_proj"), use_rslora=True, seed=23
    ),
    "pattern": TinyAdapterSpec(
        r=6,
        lora_alpha=12,
        target_modules=("k_proj", "gate_proj", "up_proj"),
        rank_pattern={"gate_proj": 12},
        alpha_pattern={"up_proj": 3},
        seed=24,
    ),
}


@pytest.fixture(scope="session")
def lora_models(tmp_path_factory: pytest.TempPathFactory):
    """arch → (base dir, {adapter name: adapter dir}), built once per session per arch."""
    root = tmp_path_factory.getbasetemp() / "lora-mix"
    built: dict[str, tuple[Path, dict[str, Path]]] = {}

    def get(arch: str) -> tuple[Path, dict[str, Path]]:
        if arch not in built:
            base = build_model(root / arch / "base", TinyModelSpec(arch=arch, seed=5))
            adapters = {
                name: build_adapter(root / arch / name, base, spec)
                for name, spec in LORA_MIX.items()
            }
            built[arch] = (base, adapters)
        return built[arch]

    return get
