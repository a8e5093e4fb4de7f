"""Llama, Mistral and Qwen2 decoders with Hugging Face's parameter names.

The names matter: `model.layers.N.self_attn.q_proj` is what PEFT adapters key their weights
by, so `inject_lora` can wrap these nn.Linear modules directly. Projections that read one input
go through `project`, which runs them as separate modules until LoRA is injected, and then
gives each group's LoRA one shrink and one expand launch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplane.runtime.lora.layer import project
from loraplane.runtime.model.config import ModelConfig
from loraplane.runtime.model.context import AttentionContext, PagedMetadata
from loraplane.runtime.model.rope import Rotary


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: Rotary) -> None:
        super().__init__()
        self.config = config
        h, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, h * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=config.o_bias)
        self.rotary = rotary
        self.scale = d**-0.5
        # Views into the runner's cache: [kv_positions, kv_heads, head_dim].
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.block_size = 0

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        # x: [tokens, hidden]
        t = x.shape[0]
        h, kv, d = self.config.num_heads, self.config.num_kv_heads, self.config.head_dim
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q, k, v = q.view(t, h, d), k.view(t, kv, d), v.view(t, kv, d)
        q, k = self.rotary(q, k, ctx.positions)
        assert self.k_cache.dim() == 3, "attach a KV cache before running the model"
        self.k_cache[ctx.kv_write_index] = k
        self.v_cache[ctx.kv_write_index] = v
        out = torch.empty_like(q)  # [tokens, h, d]
        if ctx.paged is not None:
            self._paged(q, ctx.paged, out)
            return self.o_proj(out.reshape(t, h * d))
        for g in ctx.groups:
            qp = q[g.q_index].transpose(1, 2)  # [seqs, h, q_max, d]
            kp = self.k_cache[g.kv_index].transpose(1, 2)  # [seqs, kv, ctx_max, d]
            vp = self.v_cache[g.kv_index].transpose(1, 2)
            o = F.scaled_dot_product_attention(
                qp, kp, vp, attn_mask=g.mask, scale=self.scale, enable_gqa=h != kv
            )
            rows = o.transpose(1, 2).reshape(-1, h, d)  # [seqs * q_max, h, d]
            out[g.token_index] = rows[g.valid_rows]
        return self.o_proj(out.reshape(t, h * d))

    def _paged(self, q: torch.Tensor, meta: PagedMetadata, out: torch.Tensor) -> None:
        # Imported here: the gathered path (CPU) runs without Triton's compiler in the loop.
        from loraplane.runtime.kernels.paged_attention import (
            paged_decode_attention,
            paged_prefill_attention,
        )

        n, window = meta.num_decodes, self.config.sliding_window
        if n:
            paged_decode_attention(
                q[:n],
                self.k_cache,
                self.v_cache,
                meta.block_tables[:n],
                meta.context_lens[:n],
                self.scale,
                self.block_size,
                sliding_window=window,
                out=out[:n],
            )
        if n < q.shape[0]:
            paged_prefill_attention(
                q[n:],
                self.k_cache,
                self.v_cache,
                meta.block_tables[n:],
                meta.query_start_loc,
                meta.context_lens[n:],
                meta.max_query_len,
                self.scale,
                self.block_size,
                sliding_window=window,
                out=out[n:],
            )


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hid, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hid, inter, bias=bias)
        self.up_proj = nn.Linear(hid, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hid, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: Rotary) -> None:
        super().__init__()
        self.self_attn = Attention(config, rotary)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        rotary = Rotary(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, rotary) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, ctx)
        return self.norm(x)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def attach_kv_cache(
        self, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int = 16
    ) -> None:
        # k_cache, v_cache: [layers, kv_positions, kv_heads, head_dim]
        assert k_cache.shape == v_cache.shape and k_cache.shape[0] == self.config.num_layers
        for i, layer in enumerate(self.model.layers):
            assert isinstance(layer, DecoderLayer)
            layer.self_attn.k_cache = k_cache[i]
            layer.self_attn.v_cache = v_cache[i]
            layer.self_attn.block_size = block_size

    def forward(self, input_ids: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Logits of each sequence's last token: [seqs, vocab]."""
        # input_ids: [tokens]
        assert input_ids.dim() == 1 and input_ids.shape == ctx.positions.shape
        hidden = self.model(input_ids, ctx)
        return self.lm_head(hidden[ctx.logits_index])
