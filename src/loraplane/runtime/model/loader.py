"""Build a CausalLM from a Hugging Face directory of safetensors weights (never pickles)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from loraplane.api.wire import RUNTIME_DTYPES
from loraplane.runtime.model.config import ModelConfig
from loraplane.runtime.model.llama import CausalLM

# --dtype names are torch's own attribute names.
TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in RUNTIME_DTYPES}


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {model_dir}; "
        "only safetensors weights are loaded"
    )


def load_model(model_dir: str | Path, dtype: str = "float32", device: str = "cpu") -> CausalLM:
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    # Parameters start on the meta device so a large model is never allocated twice.
    with torch.device("meta"):
        model = CausalLM(config)
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        state.update(load_file(str(path)))
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=TORCH_DTYPES[dtype])
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)
