"""Multi-LoRA layers: adapter slots, per-step metadata, LoRA-wrapped linears, a PEFT reader."""

from loraplane.runtime.lora.batch import LoraBatch, token_slots_for_rows
from loraplane.runtime.lora.layer import LoraLinear
from loraplane.runtime.lora.peft_reader import AdapterFormatError, read_peft_adapter
from loraplane.runtime.lora.weight_bank import LoraWeightBank, inject_lora
from loraplane.runtime.lora.weights import AdapterWeights, LoraModuleWeights

__all__ = [
    "AdapterFormatError",
    "AdapterWeights",
    "LoraBatch",
    "LoraLinear",
    "LoraModuleWeights",
    "LoraWeightBank",
    "inject_lora",
    "read_peft_adapter",
    "token_slots_for_rows",
]
