"""A plain Llama-family decoder that runs a flat varlen batch against a paged KV cache."""

from loraplane.runtime.model.config import ModelConfig
from loraplane.runtime.model.context import AttentionContext
from loraplane.runtime.model.llama import CausalLM
from loraplane.runtime.model.loader import load_model

__all__ = ["AttentionContext", "CausalLM", "ModelConfig", "load_model"]
