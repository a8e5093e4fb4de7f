"""The LoRA slot interface: reading PEFT adapters, loading/clearing slots, batch metadata."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loraplane.runtime.lora import (
    AdapterFormatError,
    AdapterWeights,
    LoraLinear,
    LoraModuleWeights,
    inject_lora,
    read_peft_adapter,
)


def test_reader_gives_ranks_scalings_and_module_paths(lora_models):
    _, adapters = lora_models("llama")
    rs = read_peft_adapter(adapters["rs4"])
    assert rs.target_modules == {"o_proj", "down_proj"} and rs.rank == 4
    assert rs.modules["model.layers.1.self_attn.o_proj"].scaling == pytest.approx(8 / 4**0.5)
    pattern = read_peft_adapter(adapters["pattern"])
    assert pattern.rank == 12
    gate = pattern.modules["model.layers.0.mlp.gate_proj"]
    up = pattern.modules["model.layers.0.mlp.up_proj"]
    k = pattern.modules["model.layers.0.self_attn.k_proj"]
    assert (gate.rank, gate.scaling) == (12, pytest.approx(12 / 12))
    assert (up.rank, up.scaling) == (6, pytest.approx(3 / 6))
    assert (k.rank, k.scaling) == (6, pytest.approx(12 / 6))
    assert pattern.size_bytes > 0 and pattern.base_model_name_or_path


def copy_adapter(src, dst, config_changes=None, tensors=None):
    shutil.copytree(src, dst)
    if config_changes:
        config = json.loads((dst / "adapter_config.json").read_text())
        config.update(config_changes)
        (dst / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(
            tensors(load_file(str(dst / "adapter_model.safetensors"))),
            str(dst / "adapter_model.safetensors"),
        )
    return dst


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"lora_bias": True}, "bias"),
        ({"peft_type": "IA3"}, "IA3"),
        ({"r": 5}, "rank 5"),
    ],
)
def test_reader_names_the_unsupported_feature(lora_models, tmp_path, change, message):
    _, adapters = lora_models("llama")
    bad = copy_adapter(adapters["qv8"], tmp_path / "bad", config_changes=change)
    with pytest.raises(AdapterFormatError, match=message):
        read_peft_adapter(bad)


def test_reader_rejects_missing_corrupt_and_odd_files(lora_models, tmp_path):
    _, adapters = lora_models("llama")
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json is missing"):
        read_peft_adapter(tmp_path)
    pickled = copy_adapter(adapters["qv8"], tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="pickle"):
        read_peft_adapter(pickled)
    corrupt = copy_adapter(adapters["qv8"], tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterFormatError, match="safetensors"):
        read_peft_adapter(corrupt)
    (corrupt / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="JSON"):
        read_peft_adapter(corrupt)

    def add_embedding(t):
        return {**t, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 4)}

    emb = copy_adapter(adapters["qv8"], tmp_path / "emb", tensors=add_embedding)
    with pytest.raises(AdapterFormatError, match="embeddings"):
        read_peft_adapter(emb)

    def drop_b(t):
        return {k: v for k, v in t.items() if "layers.0.self_attn.q_proj.lora_B" not in k}

    half = copy_adapter(adapters["qv8"], tmp_path / "half", tensors=drop_b)
    with pytest.raises(AdapterFormatError, match="needs lora_A and lora_B"):
        read_peft_adapter(half)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(12, 10, bias=False)
        self.o_proj = nn.Linear(10, 12, bias=True)

    def forward(self, x):
        return self.o_proj(self.q_proj(x))


def adapter(modules: dict[str, tuple[int, float]], seed=0, d=None, device="cpu") -> AdapterWeights:
    gen = torch.Generator().manual_seed(seed)
    shapes = d or {"q_proj": (12, 10), "o_proj": (10, 12)}
    mods = {}
    for path, (r, scaling) in modules.items():
        d_in, d_out = shapes[path.rsplit(".", 1)[-1]]
        mods[path] = LoraModuleWeights(
            a=torch.randn(r, d_in, generator=gen).to(device),
            b=torch.randn(d_out, r, generator=gen).to(device),
            scaling=scaling,
        )
    rank = max(m.rank for m in mods.values())
    return AdapterWeights(config={}, modules=mods, rank=rank, target_modules=set())


def manual(model: Block, x: torch.Tensor, ad: AdapterWeights | None) -> torch.Tensor:
    def lin(name, layer, v):
        out = layer.base(v)
        m = ad.modules.get(name) if ad else None
        return out if m is None else out + m.scaling * (v @ m.a.T @ m.b.T)

    return lin("o_proj", model.o_proj, lin("q_proj", model.q_proj, x))


KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # else the interpreter


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_slots_load_clear_and_batch_shapes(backend):
    torch.manual_seed(0)
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    model = Block().to(device)
    slots = inject_lora(model, ["q_proj", "o_proj"], max_slots=3, max_rank=8, backend=backend)
    assert isinstance(model.q_proj, LoraLinear) and slots.module_names == {"q_proj", "o_proj"}
    assert model.q_proj.weight is model.q_proj.base.weight  # still looks like a Linear
    both = adapter({"q_proj": (8, 0.5), "o_proj": (3, 2.0)}, seed=1, device=device)
    only_q = adapter({"q_proj": (2, 4.0)}, seed=2, device=device)
    slots.load(0, both)
    slots.load(2, only_q)
    x = torch.randn(3, 4, 12, device=device)  # HF-style [batch, seq, d]
    with torch.inference_mode():
        slots.set_batch(torch.tensor([0, -1, 2]).repeat_interleave(4))
        got = model(x)
        for row, ad in enumerate([both, None, only_q]):
            torch.testing.assert_close(got[row], manual(model, x[row], ad), rtol=1e-5, atol=1e-5)
        flat = model(x.reshape(12, 12))  # the same tokens, flat [tokens, d]
        torch.testing.assert_close(flat, got.reshape(12, 12), rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="got 4 tokens but set_batch was given 12"):
            model(x[0])
        slots.clear(0)
        torch.testing.assert_close(model(x)[0], manual(model, x[0], None))
        slots.clear_batch()
        torch.testing.assert_close(model(x)[2], manual(model, x[2], None))


def test_slots_refuse_what_does_not_fit():
    model = Block()
    slots = inject_lora(model, ["q_proj"], max_slots=2, max_rank=4)
    with pytest.raises(ValueError, match=r"'o_proj'.*not wrapped"):
        slots.load(0, adapter({"o_proj": (2, 1.0)}))
    with pytest.raises(ValueError, match="no such Linear"):
        slots.load(0, adapter({"layers.9.q_proj": (2, 1.0)}))
    with pytest.raises(ValueError, match="q_proj: adapter rank 8 exceeds max_rank 4"):
        slots.load(0, adapter({"q_proj": (8, 1.0)}))
    with pytest.raises(ValueError, match="do not fit"):
        slots.load(0, adapter({"q_proj": (2, 1.0)}, d={"q_proj": (11, 10)}))
    with pytest.raises(ValueError, match="slot 2 is outside"):
        slots.load(2, adapter({"q_proj": (2, 1.0)}))
    with pytest.raises(ValueError, match=r"outside \[-1, 2\)"):
        slots.set_batch(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="1-D integer"):
        slots.set_batch(torch.tensor([0.0]))
    untouched = Block()
    with pytest.raises(ValueError, match=r"\['v_proj'\] match no nn.Linear"):
        inject_lora(untouched, ["q_proj", "v_proj"], max_slots=2, max_rank=4)
    assert type(untouched.q_proj) is nn.Linear  # refused before anything was replaced


def test_host_batch_without_adapters_skips_lora():
    model = Block()
    slots = inject_lora(model, ["q_proj"], max_slots=2, max_rank=4)
    slots.set_batch(torch.tensor([-1, -1, -1]))
    assert slots.batch is not None and slots.batch.no_adapter


def test_siblings_share_one_shrink_launch(lora_models, monkeypatch):
    from transformers import AutoModelForCausalLM

    from loraplane.runtime.config import DEFAULT_TARGETS
    from loraplane.runtime.kernels import lora_shrink
    from loraplane.runtime.lora import group, layer

    base_dir, adapters = lora_models("llama")
    model = AutoModelForCausalLM.from_pretrained(str(base_dir)).to(KERNEL_DEVICE).eval()
    slots = inject_lora(model, DEFAULT_TARGETS, max_slots=2, max_rank=16, backend="triton")
    slots.load(1, read_peft_adapter(adapters["all16"]))
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return lora_shrink(*args, **kwargs)

    monkeypatch.setattr(group, "lora_shrink", counting)
    monkeypatch.setattr(layer, "lora_shrink", counting)
    per_forward = 4 * model.config.num_hidden_layers  # q/k/v together, o, gate/up together, down
    first, second = (torch.tensor([ids], device=KERNEL_DEVICE) for ids in ([5, 6, 7], [9, 8, 7]))
    with torch.inference_mode():
        slots.set_batch(torch.tensor([1, 1, -1]))
        model(input_ids=first)
        assert len(calls) == per_forward, calls
        # A second forward under the same batch runs its own shrinks, not the first one's.
        again = model(input_ids=second).logits
        assert len(calls) == 2 * per_forward, calls
        slots.set_batch(torch.tensor([1, 1, -1]))
        torch.testing.assert_close(again, model(input_ids=second).logits, rtol=0, atol=0)
