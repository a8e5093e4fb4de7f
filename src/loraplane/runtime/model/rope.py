"""Rotary position embeddings as Hugging Face computes them (default, linear, llama3)."""

from __future__ import annotations

import math

import torch

from loraplane.runtime.model.config import ModelConfig


def inv_frequencies(config: ModelConfig) -> torch.Tensor:
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = torch.where(medium, smoothed, scaled)
    return inv


class Rotary:
    """cos/sin tables for every position the model takes, built once per device.

    Sized by max_position_embeddings up front, never by the batch: growing on demand needs
    the largest position on the host, a device sync inside every layer of every step (and no
    CUDA graph can hold one). Kept in fp32 and cast per call, as HF does.
    """

    def __init__(self, config: ModelConfig) -> None:
        # Always on the CPU: the model may be built on the meta device.
        with torch.device("cpu"):
            self.inv = inv_frequencies(config)
        self.max_positions = config.max_position_embeddings
        self.cos = torch.empty(0)
        self.sin = torch.empty(0)

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos.device != device or self.cos.shape[0] == 0:
            t = torch.arange(self.max_positions, dtype=torch.float32, device=device)
            freqs = torch.outer(t, self.inv.to(device))
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos, self.sin = emb.cos(), emb.sin()
        return self.cos, self.sin

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [tokens, heads, d], k: [tokens, kv_heads, d], positions: [tokens], each below
        # max_position_embeddings (the engine refuses longer sequences)
        cos_table, sin_table = self.tables(q.device)
        cos = cos_table[positions].to(q.dtype)[:, None, :]
        sin = sin_table[positions].to(q.dtype)[:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
