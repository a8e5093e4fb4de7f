"""Read a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, never pickle)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from loraplane.runtime.lora.weights import AdapterWeights, LoraModuleWeights

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Config fields that change the math in ways the slot kernels do not model. A value other
# than the default means the adapter would silently give different outputs here.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights)",
    "use_qalora": "QALoRA (use_qalora)",
}
_UNSUPPORTED_LISTS = {
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer_replication",
}
_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


class AdapterFormatError(ValueError):
    """The adapter's files are missing, corrupt, or use a feature this runtime does not serve."""


def read_peft_adapter(path: str | Path) -> AdapterWeights:
    path = Path(path)
    config = _read_config(path)
    tensors = _read_tensors(path)
    pairs = _pair_tensors(path, tensors)
    modules = {}
    for module, (a, b) in sorted(pairs.items()):
        modules[module] = LoraModuleWeights(a=a, b=b, scaling=_scaling(config, module, a.shape[0]))
    if not modules:
        raise AdapterFormatError(f"{path / WEIGHTS_FILE} holds no lora_A/lora_B weights")
    return AdapterWeights(
        config=config,
        modules=modules,
        rank=max(m.rank for m in modules.values()),
        target_modules={name.rsplit(".", 1)[-1] for name in modules},
        size_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        base_model_name_or_path=config.get("base_model_name_or_path"),
    )


def _read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise AdapterFormatError(f"{file} is missing: a PEFT adapter needs {CONFIG_FILE}")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{file} must hold a JSON object, not {type(config).__name__}")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterFormatError(f"{file}: peft_type {peft_type!r} is not supported, only LORA")
    for key, what in _UNSUPPORTED_FLAGS.items():
        if config.get(key) not in (None, False, "none"):
            raise AdapterFormatError(f"{file}: {what} is not supported ({key}={config[key]!r})")
    for key, what in _UNSUPPORTED_LISTS.items():
        if config.get(key):
            raise AdapterFormatError(f"{file}: {what} is not supported ({key}={config[key]!r})")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key, 8), int | float) or config.get(key, 8) <= 0:
            raise AdapterFormatError(
                f"{file}: {key} must be a positive number, got {config[key]!r}"
            )
    return config


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
        if tensor.dim() != 2:
            raise AdapterFormatError(f"{path}: {key} has shape {tuple(tensor.shape)}, want 2-D")
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
                f"{path}: {module} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree on rank"
            )
        pairs[module] = (a, b)
    return pairs


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT's matching rule: a pattern key matches the module path or a dotted suffix of it.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    if int(r) != rank:
        raise AdapterFormatError(
            f"{module}: adapter_config.json says rank {r} but the weights have rank {rank}"
        )
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank
