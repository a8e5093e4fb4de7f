"""Tiny random-weight models, tokenizers and real PEFT adapters, built on the spot.

Nothing can come from a model hub here, so the demo and the tests make their own: a
Llama/Mistral/Qwen2-shaped model from a config with seeded random weights, a BPE tokenizer
trained on a small built-in corpus, and PEFT LoRA adapters with `init_lora_weights=False`
(PEFT's default init makes B zero, so an adapter would change nothing and prove nothing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from loraplane.runtime.config import DEFAULT_TARGETS
from loraplane.runtime.model.config import SUPPORTED_TYPES

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a tiny model serves many adapters on one base",
    "hello world, how are you today?",
    "write a python function that adds two numbers",
    "def add(a, b):\n    return a + b",
    "thank you for contacting customer support, how can i help you?",
    "my order has not arrived yet and i would like a refund",
    "kubernetes operators reconcile the desired state of the world",
    "low rank adaptation trains small matrices next to frozen weights",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
    "the cat sat on the mat. the dog sat on the log.",
    "SELECT name FROM users WHERE id = 42;",
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    arch: str = "llama"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_TYPES:
            raise ValueError(f"arch {self.arch!r} is not one of {SUPPORTED_TYPES}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")


@dataclass(frozen=True)
class TinyAdapterSpec:
    r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False
    seed: int = 1
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, int] = field(default_factory=dict)


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on CORPUS and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def _config(spec: TinyModelSpec, vocab_size: int, tokenizer):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[spec.arch]
    return cls(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )


def build_model(out_dir: str | Path, spec: TinyModelSpec | None = None) -> Path:
    """Write a tiny random-weight causal LM (config.json, safetensors, tokenizer) to out_dir."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out, spec.vocab_size)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(_config(spec, len(tokenizer), tokenizer))
    # Default init draws weights with std 0.02: logits would be nearly flat, so greedy
    # decoding would hinge on float noise. Wider weights make every argmax decisive.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.5 if "embed" in name else param.shape[1] ** -0.5)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def build_adapter(out_dir: str | Path, base_dir: str | Path, spec: TinyAdapterSpec) -> Path:
    """Write a real PEFT LoRA adapter for the model in base_dir, with non-zero random B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        target_modules=list(spec.target_modules),
        use_rslora=spec.use_rslora,
        rank_pattern=dict(spec.rank_pattern),
        alpha_pattern=dict(spec.alpha_pattern),
        init_lora_weights=False,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(spec.seed)
    model = get_peft_model(base, config)
    model.save_pretrained(str(out), safe_serialization=True)
    # PEFT records the in-memory path of the base; record the directory we were given.
    config_path = out / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True))
    return out


# A few adapters that differ in every way a runtime must honour.
DEMO_ADAPTERS: dict[str, TinyAdapterSpec] = {
    "sql-expert": TinyAdapterSpec(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), seed=11),
    "support-bot": TinyAdapterSpec(r=16, lora_alpha=8, target_modules=DEFAULT_TARGETS, seed=12),
    "poet": TinyAdapterSpec(
        r=4, lora_alpha=8, target_modules=("o_proj", "down_proj"), use_rslora=True, seed=13
    ),
}


def build_demo(root: str | Path, spec: TinyModelSpec | None = None) -> tuple[Path, dict[str, Path]]:
    """A base model and the DEMO_ADAPTERS under root; reuses what an earlier call wrote."""
    root = Path(root)
    base = root / "base"
    if not (base / "config.json").exists():
        build_model(base, spec)
    adapters = {}
    for name, adapter_spec in DEMO_ADAPTERS.items():
        path = root / "adapters" / name
        if not (path / "adapter_config.json").exists():
            build_adapter(path, base, adapter_spec)
        adapters[name] = path
    return base, adapters


# What the demo teaches each adapter to say after DEMO_PROMPT, so one batch visibly holds
# three different fine-tunes (the random base says nothing sensible).
DEMO_PROMPT = "hello world, how are"
DEMO_LESSONS: dict[str, str] = {
    "sql-expert": " SELECT name FROM users WHERE id = 42;",
    "support-bot": " thank you for contacting customer support, how can i help you?",
    "poet": " the cat sat on the mat. the dog sat on the log.",
}


def teach_adapter(adapter_dir: str | Path, base_dir: str | Path, prompt: str, text: str) -> Path:
    """Train a saved adapter in place until greedy decoding of prompt gives text, then EOS."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    p = tokenizer.encode(prompt, add_special_tokens=False)
    t = [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    ids, labels = torch.tensor([p + t]), torch.tensor([[-100] * len(p) + t])
    params = [x for x in model.parameters() if x.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    try:
        for _ in range(400):
            out = model(input_ids=ids, labels=labels)
            greedy = out.logits[0, len(p) - 1 : -1].argmax(-1)
            # Stop once every token is the argmax with some margin (loss < 0.5).
            if bool((greedy == labels[0, len(p) :]).all()) and out.loss.item() < 0.5:
                break
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
        else:
            raise RuntimeError(f"adapter {adapter_dir} did not learn {text!r} in 400 steps")
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(str(adapter_dir), safe_serialization=True)
    # save_pretrained rewrites the config: keep the base directory we were given.
    config_path = Path(adapter_dir) / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True))
    return Path(adapter_dir)


def build_taught_demo(root: str | Path) -> tuple[Path, dict[str, Path]]:
    """build_demo, with each adapter taught its DEMO_LESSONS line; reuses earlier results."""
    base, adapters = build_demo(root)
    taught = {}
    for name, path in adapters.items():
        out = Path(root) / "taught" / name
        if not (out / "adapter_model.safetensors").exists():
            import shutil

            tmp = out.with_name(f".{name}.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(path, tmp)
            teach_adapter(tmp, base, DEMO_PROMPT, DEMO_LESSONS[name])
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        taught[name] = out
    return base, taught
