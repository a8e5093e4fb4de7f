"""The models and adapters bench/serve.py serves: random weights, built on the spot.

The tiny and small bases come from loraplane.testing.tiny (on the CPU); the Llama-3-8B-shaped
one is built on the GPU in bf16 (on a CPU its fp32 init alone takes minutes). Adapters are
written straight in PEFT's format (adapter_config.json + adapter_model.safetensors): PEFT's
own save, as testing.tiny.build_adapter does it, loads the base once per adapter, which for
32 adapters of an 8B base takes longer than the benchmark.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Preset:
    model: dict  # TinyModelSpec fields (tiny, small) or LlamaConfig fields (8B-shaped)
    adapters: int
    requests: int
    concurrency: int
    new_tokens: int
    # Even adapters rank 16 on all 7 projections, odd ones rank 8 on q/v; else all rank 16/7.
    mixed_adapters: bool = True
    on_gpu: bool = False  # the base built on the GPU in bf16


PRESETS = {
    "tiny": Preset(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        adapters=4,
        requests=48,
        concurrency=16,
        new_tokens=16,
    ),
    "small": Preset(  # ~100M parameters
        {
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_hidden_layers": 8,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "max_position_embeddings": 2048,
        },
        adapters=8,
        requests=256,
        concurrency=64,
        new_tokens=64,
    ),
    # Llama-3-8B's layers; the vocabulary is the test tokenizer's (~512, not 128256), so every
    # token the random model picks decodes: 7.0B parameters instead of 8.0B.
    "llama3-8b-shaped": Preset(
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "max_position_embeddings": 8192,
            "rope_theta": 500000.0,
        },
        adapters=32,
        requests=128,
        concurrency=64,
        new_tokens=64,
        mixed_adapters=False,
        on_gpu=True,
    ),
}


def build(work: Path, name: str, n_adapters: int) -> tuple[Path, dict[str, Path]]:
    """(base dir, {adapter name: dir}) under work; reuses what an earlier run wrote."""
    preset = PRESETS[name]
    base = work / f"base-{name}"
    if not (base / "config.json").exists():
        (build_on_gpu if preset.on_gpu else build_tiny)(base, preset)
    adapters = {}
    for i in range(n_adapters):
        path = work / f"adapter-{name}-{i}"
        mixed_small = preset.mixed_adapters and i % 2 == 1
        rank, targets = (8, ("q_proj", "v_proj")) if mixed_small else (16, TARGETS)
        if not (path / "adapter_config.json").exists():
            write_adapter(path, base, rank, targets, seed=100 + i)
        adapters[f"a{i}"] = path
    return base, adapters


def build_tiny(base: Path, preset: Preset) -> None:
    from loraplane.testing.tiny import TinyModelSpec, build_model

    build_model(base, TinyModelSpec(**preset.model))


def build_on_gpu(base: Path, preset: Preset) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraplane.testing.tiny import build_tokenizer

    base.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(base)
    cfg = LlamaConfig(
        **preset.model,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():  # the widths build_model uses: decisive argmaxes, bounded activations
        for pname, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.5 if "embed" in pname else param.shape[1] ** -0.5)
    model.save_pretrained(str(base), safe_serialization=True)
    del model
    torch.cuda.empty_cache()


def write_adapter(path: Path, base: Path, rank: int, targets, seed: int) -> None:
    """A PEFT LoRA adapter of the base's dtype, random A and B (B too: PEFT's default zero B
    would make every adapter the base)."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((base / "config.json").read_text())
    dtype = getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (d // cfg["num_attention_heads"])
    shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d)}
    shapes |= {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for t in targets:
            d_in, d_out = shapes[t]
            block = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{i}.{block}.{t}"
            a = torch.randn(rank, d_in, device=device, generator=gen) * d_in**-0.5
            b = torch.randn(d_out, rank, device=device, generator=gen) * rank**-0.5
            tensors[f"{key}.lora_A.weight"] = a.to(dtype).cpu()
            tensors[f"{key}.lora_B.weight"] = b.to(dtype).cpu()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
