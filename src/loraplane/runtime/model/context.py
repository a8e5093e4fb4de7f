"""Per-step attention metadata, computed once by the model runner and shared by all layers.

The batch is flat: the tokens of every sequence laid end to end, prefill chunks and single
decode tokens alike. Attention runs padded per sequence, so one SDPA call serves the whole
mixed batch; `q_valid` undoes the padding in the same token order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionContext:
    positions: torch.Tensor  # [tokens] position of each token in its sequence
    slot_mapping: torch.Tensor  # [tokens] flat KV-cache index each token's k/v is written to
    q_index: torch.Tensor  # [seqs, q_max] index into the flat tokens (0 where padded)
    q_valid: torch.Tensor  # [seqs, q_max] bool, False on padding
    kv_index: torch.Tensor  # [seqs, ctx_max] flat KV-cache index of each context position
    mask: torch.Tensor  # [seqs, 1, q_max, ctx_max] bool, True where attention is allowed
    logits_index: torch.Tensor  # [seqs] flat index of each sequence's last token

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        sliding_window: int | None = None,
        device: torch.device | str = "cpu",
    ) -> AttentionContext:
        """Metadata for sequences whose last query_lens[i] of context_lens[i] tokens are new."""
        assert len(query_lens) == len(context_lens) == len(block_tables)
        n, q_max, ctx_max = len(query_lens), max(query_lens), max(context_lens)
        ql = torch.tensor(query_lens)
        cl = torch.tensor(context_lens)
        starts = torch.cumsum(ql, 0) - ql
        j = torch.arange(q_max)
        q_valid = j[None, :] < ql[:, None]
        q_index = torch.where(q_valid, starts[:, None] + j[None, :], 0)
        # Position of query j of sequence i is ctx_len - q_len + j.
        q_pos = (cl - ql)[:, None] + j[None, :]
        c = torch.arange(ctx_max)
        table = torch.zeros(n, max(len(t) for t in block_tables), dtype=torch.long)
        for i, t in enumerate(block_tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        needed = (cl + block_size - 1) // block_size
        assert bool((torch.tensor([len(t) for t in block_tables]) >= needed).all())
        block_of_c = (c // block_size).clamp(max=table.shape[1] - 1)
        kv_index = table[:, block_of_c] * block_size + (c % block_size)[None, :]
        kv_valid = c[None, :] < cl[:, None]
        kv_index = torch.where(kv_valid, kv_index, 0)
        mask = kv_valid[:, None, :] & (c[None, None, :] <= q_pos[:, :, None])
        if sliding_window is not None:
            mask &= q_pos[:, :, None] - c[None, None, :] < sliding_window
        # Padded query rows would otherwise attend to nothing and produce NaN.
        mask |= ~q_valid[:, :, None] & (c[None, None, :] == 0)
        positions = q_pos[q_valid]
        slot_mapping = kv_index.gather(1, q_pos.clamp(max=ctx_max - 1))[q_valid]
        logits_index = starts + ql - 1
        return cls(
            positions=positions.to(device),
            slot_mapping=slot_mapping.to(device),
            q_index=q_index.to(device),
            q_valid=q_valid.to(device),
            kv_index=kv_index.to(device),
            mask=mask[:, None].to(device),
            logits_index=logits_index.to(device),
        )
