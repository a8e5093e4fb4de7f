"""Our decoder's logits equal Hugging Face's, for prefill and decode mixed in one flat batch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraplane.runtime.model import AttentionContext, CausalLM, ModelConfig, load_model

BLOCK = 4


def run_flat(model: CausalLM, seqs: list[list[int]], done: list[int], cache_blocks: dict):
    """Feed the tokens of each sequence past done[i] as one flat batch; return last logits."""
    cfg = model.config
    ids, qlens, clens, tables = [], [], [], []
    for i, s in enumerate(seqs):
        ids += s[done[i] :]
        qlens.append(len(s) - done[i])
        clens.append(len(s))
        table = cache_blocks.setdefault(i, [])
        while len(table) * BLOCK < len(s):
            table.append(sum(len(t) for t in cache_blocks.values()))
        tables.append(table)
    ctx = AttentionContext.build(qlens, clens, tables, BLOCK, cfg.sliding_window)
    return model(torch.tensor(ids), ctx)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_logits_match_hf_for_mixed_prefill_and_decode(arch, arch_model_dir):
    path = arch_model_dir(arch)
    ours = load_model(path)
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    cfg = ours.config
    slots = 64 * BLOCK
    shape = (cfg.num_layers, slots, cfg.num_kv_heads, cfg.head_dim)
    ours.attach_kv_cache(torch.zeros(shape), torch.zeros(shape))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (7, 3, 11)]
    tables: dict = {}
    # Step 1: sequence 0 and 1 prefill together.
    logits = run_flat(ours, seqs[:2], [0, 0], tables)
    # Step 2: 0 and 1 decode one token each while sequence 2 prefills in the same batch.
    for s, row in zip(seqs[:2], logits, strict=True):
        s.append(int(row.argmax()))
    logits = run_flat(ours, seqs, [len(seqs[0]) - 1, len(seqs[1]) - 1, 0], tables)
    with torch.no_grad():
        for s, row in zip(seqs, logits, strict=True):
            expected = hf(torch.tensor([s])).logits[0, -1]
            torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-5)


def test_config_errors_name_the_value():
    base = dict(
        model_type="gpt2",
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    with pytest.raises(ValueError, match="gpt2"):
        ModelConfig.from_hf(base)
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf(
            base | {"model_type": "llama", "rope_parameters": {"rope_type": "yarn"}}
        )
