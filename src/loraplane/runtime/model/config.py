"""The architecture numbers we need, read from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not served; supported: {SUPPORTED_TYPES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE:
            raise ValueError(f"rope_type {rope_type!r} is not served; supported: {SUPPORTED_ROPE}")

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: --model must hold a config.json")
        return cls.from_hf(json.loads(path.read_text()))

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        model_type = hf.get("model_type", "")
        if model_type not in SUPPORTED_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not served; supported: {SUPPORTED_TYPES}"
            )
        try:
            return cls._from_hf(hf, model_type)
        except KeyError as e:
            raise ValueError(f"config.json has no {e.args[0]!r}") from e

    @classmethod
    def _from_hf(cls, hf: dict[str, Any], model_type: str) -> ModelConfig:
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not served; only silu")
        heads = hf["num_attention_heads"]
        # transformers 5 nests rope settings in rope_parameters; 4.x had them at the top.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope["type"]
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        window = None
        if model_type == "mistral":
            window = hf.get("sliding_window")
        elif model_type == "qwen2" and hf.get("use_sliding_window"):
            raise ValueError("qwen2 with use_sliding_window is not served")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope,
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=window,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            eos_token_ids=eos_ids,
            bos_token_id=hf.get("bos_token_id"),
            dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
        )
