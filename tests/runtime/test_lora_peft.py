"""A mixed padded batch through our LoRA layers gives, row by row, the logits PEFT gives."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraplane.runtime.config import DEFAULT_TARGETS
from loraplane.runtime.lora import inject_lora, read_peft_adapter, token_slots_for_rows

# Row → adapter (None = base). Repeats and a base row in the middle make segments uneven.
ROWS = ["qv8", None, "all16", "rs4", "pattern", "all16", None, "qv8"]
SEQ = 7
# The Triton path runs on the GPU where there is one, else under the interpreter (conftest).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def padded_batch(seed: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (len(ROWS), SEQ), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 2, 0, 3, 1, 0, 4, 0]):  # left padding, as generation does
        ids[row, :pad] = 3
        mask[row, :pad] = 0
    return ids, mask


def peft_logits(base_dir, adapters, ids, mask) -> torch.Tensor:
    names = list(adapters)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base_dir)),
        str(adapters[names[0]]),
        adapter_name=names[0],
    )
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    out = torch.empty(len(ROWS), SEQ, model.config.vocab_size)
    with torch.inference_mode():
        with model.disable_adapter():
            base = model(input_ids=ids, attention_mask=mask).logits
        per_adapter = {}
        for name in names:
            model.set_adapter(name)
            per_adapter[name] = model(input_ids=ids, attention_mask=mask).logits
        for row, name in enumerate(ROWS):
            out[row] = base[row] if name is None else per_adapter[name][row]
        # PEFT's own mixed-batch path must agree with its per-adapter path (sanity of the oracle).
        mixed = model(
            input_ids=ids, attention_mask=mask, adapter_names=[n or "__base__" for n in ROWS]
        ).logits
    torch.testing.assert_close(mixed, out, rtol=1e-5, atol=1e-5)
    return out


def our_logits(base_dir, adapters, ids, mask, backend: str) -> torch.Tensor:
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(base_dir)).to(device).eval()
    ids, mask = ids.to(device), mask.to(device)
    slots = inject_lora(model, DEFAULT_TARGETS, max_slots=6, max_rank=16, backend=backend)
    # q/k/v and gate/up of every layer share one shrink launch on the kernel path.
    assert len(slots.groups) == 2 * model.config.num_hidden_layers
    slot_of = {}
    for slot, name in zip([4, 0, 2, 5], adapters, strict=True):  # slot ids need not be dense
        slots.load(slot, read_peft_adapter(adapters[name]))
        slot_of[name] = slot
    row_slots = torch.tensor([-1 if n is None else slot_of[n] for n in ROWS])
    with torch.inference_mode():
        slots.set_batch(token_slots_for_rows(row_slots, SEQ))
        logits = model(input_ids=ids, attention_mask=mask).logits
        slots.clear_batch()
        plain = model(input_ids=ids, attention_mask=mask).logits
    return logits.cpu(), plain.cpu()


def assert_rows_match(ours, ref, mask, base_only: bool = False) -> None:
    assert not ours.isnan().any()
    for row, name in enumerate([None] * len(ROWS) if base_only else ROWS):
        live = mask[row].bool()
        got, want = ours[row, live], ref[row, live]
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5, f"row {row} ({name or 'base'}): relative error {err:.2e}"


@pytest.mark.parametrize(
    ("arch", "backend"),
    [("llama", "torch"), ("llama", "triton"), ("qwen2", "torch"), ("mistral", "triton")],
)
def test_mixed_batch_matches_peft_row_by_row(lora_models, arch, backend):
    base_dir, adapters = lora_models(arch)
    ids, mask = padded_batch(seed=len(arch), vocab=500)
    ref = peft_logits(base_dir, adapters, ids, mask)
    ours, plain = our_logits(base_dir, adapters, ids, mask, backend)
    assert_rows_match(ours, ref, mask)
    # After clear_batch the wrapped model is the plain base again.
    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    with torch.inference_mode():
        assert_rows_match(
            plain, base(input_ids=ids, attention_mask=mask).logits, mask, base_only=True
        )
    # The adapters really change the output, so a match above proves something.
    for row, name in enumerate(ROWS):
        if name is not None:
            assert (ours[row] - plain[row]).abs().max() > 1e-2, f"{name} changed nothing"
