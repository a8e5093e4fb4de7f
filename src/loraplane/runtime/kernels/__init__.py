"""Multi-LoRA Triton kernels, each beside its launcher and a torch reference."""

from loraplane.runtime.kernels.lora_expand import lora_expand, lora_expand_ref
from loraplane.runtime.kernels.lora_shrink import lora_shrink, lora_shrink_ref
from loraplane.runtime.kernels.segments import SegmentTiles, segment_tiles

__all__ = [
    "SegmentTiles",
    "lora_expand",
    "lora_expand_ref",
    "lora_shrink",
    "lora_shrink_ref",
    "segment_tiles",
]
