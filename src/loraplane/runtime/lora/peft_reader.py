"""Read a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, never pickle)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from loraplane.runtime.lora.peft_config import AdapterFormatError, PeftConfig, read_config
from loraplane.runtime.lora.weights import AdapterWeights, LoraModuleWeights

__all__ = ["AdapterFormatError", "read_peft_adapter"]

WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
MAX_MODULE_CHARS = 512  # module paths of real models are well under 100 characters
# |alpha / r| above this is no fine-tune: the delta would swamp the base, and in a 16-bit slot
# it overflows to inf for the adapter's own requests.
MAX_SCALING = 1e4

_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def read_peft_adapter(path: str | Path) -> AdapterWeights:
    path = Path(path)
    config = read_config(path)
    tensors = _read_tensors(path)
    pairs = _pair_tensors(path, tensors)
    modules = {}
    for module, (a, b) in sorted(pairs.items()):
        modules[module] = LoraModuleWeights(a=a, b=b, scaling=_scaling(config, module, a.shape[0]))
    if not modules:
        raise AdapterFormatError(f"{path / WEIGHTS_FILE} holds no lora_A/lora_B weights")
    return AdapterWeights(
        config=config.raw,
        modules=modules,
        rank=max(m.rank for m in modules.values()),
        target_modules={name.rsplit(".", 1)[-1] for name in modules},
        size_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        base_model_name_or_path=config.base_model_name_or_path,
    )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / WEIGHTS_FILE
    if not file.is_file():
        hint = (
            " (adapter_model.bin is pickle and never loaded)"
            if (path / "adapter_model.bin").exists()
            else ""
        )
        raise AdapterFormatError(f"{file} is missing{hint}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFormatError(f"{file} is not a readable safetensors file: {e}") from e


def _pair_tensors(
    path: Path, tensors: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if "lora_embedding" in key or "embed_tokens" in key or "lm_head" in key:
            raise AdapterFormatError(
                f"{path}: LoRA on embeddings or lm_head is not supported ({key})"
            )
        if key.endswith(".bias"):
            raise AdapterFormatError(f"{path}: LoRA bias is not supported ({key})")
        match = _KEY.match(key)
        if match is None:
            raise AdapterFormatError(f"{path}: unexpected tensor {key!r} in {WEIGHTS_FILE}")
        module = match["module"].removeprefix(PREFIX)
        if len(module) > MAX_MODULE_CHARS:
            raise AdapterFormatError(f"{path}: tensor name {key[:80]!r}... is too long", key[:80])
        if tensor.dim() != 2 or 0 in tensor.shape:
            raise AdapterFormatError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, want 2-D and not empty", key
            )
        if not tensor.is_floating_point():
            raise AdapterFormatError(f"{path}: {key} is {tensor.dtype}, not floating point", key)
        if not bool(torch.isfinite(tensor).all()):
            # One NaN in a slot reaches every token of the adapter, and NaN spreads.
            raise AdapterFormatError(f"{path}: {key} holds NaN or infinite values", key)
        found.setdefault(module, {})[match["kind"]] = tensor
    pairs = {}
    for module, parts in found.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise AdapterFormatError(
                f"{path}: {module} has {sorted(parts)}, needs lora_A and lora_B"
            )
        a, b = parts["lora_A"], parts["lora_B"]
        if a.shape[0] != b.shape[1]:
            raise AdapterFormatError(
                f"{path}: {module} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                "disagree on rank",
                module,
            )
        pairs[module] = (a, b)
    return pairs


def _scaling(config: PeftConfig, module: str, rank: int) -> float:
    r = config.rank_for(module)
    if r != rank:
        raise AdapterFormatError(
            f"{module}: adapter_config.json says rank {r} but the weights have rank {rank}",
            "rank_pattern" if config.rank_pattern else "r",
        )
    alpha = config.alpha_for(module)
    scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
    if not scaling <= MAX_SCALING:
        raise AdapterFormatError(
            f"{module}: lora_alpha {alpha:g} over rank {rank} scales the update by {scaling:g}, "
            f"more than {MAX_SCALING:g}; no trained adapter needs that",
            "alpha_pattern" if config.alpha_pattern else "lora_alpha",
        )
    return scaling
