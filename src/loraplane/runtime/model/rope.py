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
    """cos/sin tables grown on demand; kept in fp32 and cast per call like HF does."""

    def __init__(self, config: ModelConfig) -> None:
        # Always on the CPU: the model may be built on the meta device.
        with torch.device("cpu"):
            self.inv = inv_frequencies(config)
        self.cos = torch.empty(0)
        self.sin = torch.empty(0)

    def _grow(self, length: int, device: torch.device) -> None:
        length = max(length, 2 * self.cos.shape[0], 256)
        t = torch.arange(length, dtype=torch.float32, device=device)
        freqs = torch.outer(t, self.inv.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [tokens, heads, d], k: [tokens, kv_heads, d], positions: [tokens]
        top = int(positions.max()) + 1 if positions.numel() else 0
        if top > self.cos.shape[0] or self.cos.device != q.device:
            self._grow(top, q.device)
        cos = self.cos[positions].to(q.dtype)[:, None, :]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
