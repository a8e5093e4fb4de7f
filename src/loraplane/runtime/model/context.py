"""Per-step attention metadata, computed once by the model runner and shared by all layers.

The batch is flat: the tokens of every sequence laid end to end, prefill chunks and single
decode tokens alike, decodes first. Two ways to run attention over it:

- paged (the GPU's): Triton kernels read k/v straight from the cache through each sequence's
  block table (kernels/paged_attention.py); the leading one-query sequences go to the decode
  kernel, the rest to the varlen prefill kernel. Only small int32 tables cross to the device.
- gathered (the CPU's, and the reference): each group, decodes and prefills, is gathered
  padded per sequence and run through SDPA with a mask, so one long prompt never pads every
  decode to its length; each group's `token_index` puts its outputs back in flat order.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch


@dataclass
class AttentionGroup:
    token_index: torch.Tensor  # [group tokens] flat index of each valid query, row-major
    q_index: torch.Tensor  # [seqs, q_max] index into the flat tokens (0 where padded)
    q_valid: torch.Tensor  # [seqs, q_max] bool, False on padding
    valid_rows: torch.Tensor  # [group tokens] flat index into [seqs * q_max] of each valid query
    kv_index: torch.Tensor  # [seqs, ctx_max] flat KV-cache index of each context position
    mask: torch.Tensor  # [seqs, 1, q_max, ctx_max] bool, True where attention is allowed


@dataclass
class PagedMetadata:
    num_decodes: int  # the leading sequences with one query each: the decode kernel's
    block_tables: torch.Tensor  # [seqs, width] int32, 0 past each table's end
    context_lens: torch.Tensor  # [seqs] int32: tokens in the cache after this step's writes
    query_start_loc: torch.Tensor  # [prefill seqs + 1] int32, from the first prefill token
    max_query_len: int  # of the prefill sequences (host int: the kernel's grid)


@dataclass
class AttentionContext:
    positions: torch.Tensor  # [tokens] position of each token in its sequence
    kv_write_index: torch.Tensor  # [tokens] flat KV-cache index each token's k/v is written to
    logits_index: torch.Tensor  # [seqs] flat index of each sequence's last token
    groups: list[AttentionGroup]  # gathered attention (empty when paged)
    paged: PagedMetadata | None = None

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        sliding_window: int | None = None,
        device: torch.device | str = "cpu",
        pad_kv_index: int = 0,
        paged: bool = False,
        table_width: int | None = None,
    ) -> AttentionContext:
        """Metadata for sequences whose last query_lens[i] of context_lens[i] tokens are new.

        pad_kv_index: the KV-cache index padded context positions read. Masking alone is not
        enough: a masked score still multiplies its V, and 0 * NaN is NaN, so a NaN left in a
        reused block by another request would reach this one. The runner passes a position
        that is never written (always zero).
        paged: metadata for the paged kernels instead of gathered groups; table_width pads
        every block table to that many entries (a CUDA graph's fixed shape).
        """
        assert len(query_lens) == len(context_lens) == len(block_tables)
        assert all(0 < q <= c for q, c in zip(query_lens, context_lens, strict=True))
        for table, c in zip(block_tables, context_lens, strict=True):
            assert len(table) * block_size >= c, "block table too short for its context"
        ql = torch.tensor(query_lens)
        starts = torch.cumsum(ql, 0) - ql
        # Whole-batch tensor ops, not a loop of small ones per sequence: a few dozen host
        # operations per step, whatever the batch (64 sequences cost 2 ms the other way).
        tables = _padded_tables(block_tables, table_width)  # [seqs, width] int32
        seq_of = torch.repeat_interleave(torch.arange(len(query_lens)), ql)  # [tokens]
        first = torch.tensor(context_lens) - ql  # each sequence's first new position
        pos = first[seq_of] + torch.arange(int(ql.sum())) - starts[seq_of]
        writes = tables[seq_of, pos // block_size].long() * block_size + pos % block_size
        if paged:
            meta = _paged(query_lens, context_lens, tables, device)
            return cls(
                positions=pos.to(device),
                kv_write_index=writes.to(device),
                logits_index=(starts + ql - 1).to(device),
                groups=[],
                paged=meta,
            )
        groups = []
        for decode in (True, False):
            members = [i for i, q in enumerate(query_lens) if (q == 1) == decode]
            if members:
                groups.append(
                    _group(
                        members,
                        query_lens,
                        context_lens,
                        block_tables,
                        starts,
                        block_size,
                        sliding_window,
                        device,
                        pad_kv_index,
                    )
                )
        return cls(
            positions=pos.to(device),
            kv_write_index=writes.to(device),
            logits_index=(starts + ql - 1).to(device),
            groups=groups,
        )


def _padded_tables(block_tables: list[list[int]], width: int | None) -> torch.Tensor:
    """[seqs, width] int32, 0 past each table's end; from one flat array, not per row."""
    width = width or max(len(t) for t in block_tables)
    assert all(len(t) <= width for t in block_tables), "a block table is wider than the graph's"
    flat = array("i")
    for table in block_tables:
        flat.extend(table)
        flat.extend([0] * (width - len(table)))
    return torch.frombuffer(flat, dtype=torch.int32).view(len(block_tables), width)


def _paged(
    query_lens: list[int],
    context_lens: list[int],
    tables: torch.Tensor,
    device: torch.device | str,
) -> PagedMetadata:
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    prefill = query_lens[num_decodes:]
    qsl = torch.zeros(len(prefill) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(prefill, dtype=torch.int32), 0)
    return PagedMetadata(
        num_decodes=num_decodes,
        block_tables=tables.to(device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32).to(device),
        query_start_loc=qsl.to(device),
        max_query_len=max(prefill, default=0),
    )


def _group(
    members: list[int],
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    starts: torch.Tensor,
    block_size: int,
    sliding_window: int | None,
    device: torch.device | str,
    pad_kv_index: int,
) -> AttentionGroup:
    ql = torch.tensor([query_lens[i] for i in members])
    cl = torch.tensor([context_lens[i] for i in members])
    st = starts[members]
    n, q_max, ctx_max = len(members), int(ql.max()), int(cl.max())
    j = torch.arange(q_max)
    q_valid = j[None, :] < ql[:, None]
    q_index = torch.where(q_valid, st[:, None] + j[None, :], 0)
    q_pos = (cl - ql)[:, None] + j[None, :]  # query j of a sequence sits at ctx - q + j
    c = torch.arange(ctx_max)
    width = max(len(block_tables[i]) for i in members)
    table = torch.zeros(n, width, dtype=torch.long)
    for row, i in enumerate(members):
        table[row, : len(block_tables[i])] = torch.tensor(block_tables[i], dtype=torch.long)
    block_of_c = (c // block_size).clamp(max=width - 1)
    kv_valid = c[None, :] < cl[:, None]
    kv_index = torch.where(
        kv_valid, table[:, block_of_c] * block_size + c % block_size, pad_kv_index
    )
    mask = kv_valid[:, None, :] & (c[None, None, :] <= q_pos[:, :, None])
    if sliding_window is not None:
        mask &= q_pos[:, :, None] - c[None, None, :] < sliding_window
    # Padded query rows would otherwise attend to nothing and produce NaN.
    mask |= ~q_valid[:, :, None] & (c[None, None, :] == 0)
    return AttentionGroup(
        token_index=q_index[q_valid].to(device),
        q_index=q_index.to(device),
        q_valid=q_valid.to(device),
        # Built here, on the host: indexing by q_valid on the device would sync every layer.
        valid_rows=q_valid.reshape(-1).nonzero()[:, 0].to(device),
        kv_index=kv_index.to(device),
        mask=mask[:, None].to(device),
    )
