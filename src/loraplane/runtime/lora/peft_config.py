"""adapter_config.json, checked field by field: every value the runtime will use is valid here.

The file comes from an adapter's author, not from us: a value that is the wrong type, not
finite, or a pattern that would hang a backtracking regex is refused at load, naming the field,
never discovered on a request's first use.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplane.runtime.lora.patterns import ModulePattern, PatternError

CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20  # real configs are a few KiB
MAX_RANK = 1 << 16  # beyond any --max-lora-rank; the real bound is checked against the base
MAX_PATTERNS = 4096  # one per module of a large model is the most a real adapter writes

# Config fields that change the math in ways the slot kernels do not model. A value other
# than the default means the adapter would silently give different outputs here.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights)",
    "use_qalora": "QALoRA (use_qalora)",
}
_UNSUPPORTED_LISTS = {
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer_replication",
}


class AdapterFormatError(ValueError):
    """The adapter's files are missing, corrupt, or use a feature this runtime does not serve.

    field names the config field or tensor at fault, so an API refusal can point at it.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class PeftConfig:
    raw: dict[str, Any]  # the file as read
    r: int
    lora_alpha: float
    use_rslora: bool
    base_model_name_or_path: str | None
    rank_pattern: list[tuple[ModulePattern, int]] = field(default_factory=list)
    alpha_pattern: list[tuple[ModulePattern, float]] = field(default_factory=list)

    def rank_for(self, module: str) -> int:
        return _first(self.rank_pattern, module, self.r)

    def alpha_for(self, module: str) -> float:
        return _first(self.alpha_pattern, module, self.lora_alpha)


def _first(patterns: list[tuple[ModulePattern, Any]], module: str, default: Any) -> Any:
    # PEFT's rule: the first key (in file order) that matches the module path or a dotted suffix.
    for pattern, value in patterns:
        if pattern.matches(module):
            return value
    return default


def read_config(path: Path) -> PeftConfig:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise AdapterFormatError(f"{file} is missing: a PEFT adapter needs {CONFIG_FILE}")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterFormatError(
            f"{file} is {file.stat().st_size} bytes, more than {MAX_CONFIG_BYTES}: "
            "not an adapter config"
        )
    try:
        config = json.loads(file.read_bytes(), parse_constant=_refuse_constant)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{file} is not valid JSON: {e}") from e
    except RecursionError as e:
        raise AdapterFormatError(f"{file} is nested too deeply to be an adapter config") from e
    except _NonFinite as e:
        raise AdapterFormatError(f"{file} holds {e}, which is not a number JSON allows") from e
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{file} must hold a JSON object, not {type(config).__name__}")
    return _check(file, config)


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)  # NaN, Infinity, -Infinity: Python's json accepts them by default


def _check(file: Path, config: dict[str, Any]) -> PeftConfig:
    def bad(key: str, want: str) -> AdapterFormatError:
        return AdapterFormatError(f"{file}: {key} must be {want}, got {config[key]!r:.100}", key)

    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str):
        raise bad("peft_type", "a string")
    if peft_type.upper() != "LORA":
        raise AdapterFormatError(
            f"{file}: peft_type {peft_type!r:.60} is not supported, only LORA", "peft_type"
        )
    for key, what in _UNSUPPORTED_FLAGS.items():
        if config.get(key) not in (None, False, "none"):
            raise AdapterFormatError(
                f"{file}: {what} is not supported ({key}={config[key]!r})", key
            )
    for key, what in _UNSUPPORTED_LISTS.items():
        if config.get(key):
            raise AdapterFormatError(
                f"{file}: {what} is not supported ({key}={config[key]!r:.100})", key
            )
    r = config.get("r", 8)
    if _as_rank(r) is None:
        raise bad("r", f"an integer in 1..{MAX_RANK}")
    alpha = config.get("lora_alpha", 8)
    if not _positive_finite(alpha):
        raise bad("lora_alpha", "a positive finite number")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise bad("base_model_name_or_path", "a string or null")
    rslora = config.get("use_rslora", False)
    if rslora is not None and not isinstance(rslora, bool):
        raise bad("use_rslora", "true or false")
    return PeftConfig(
        raw=config,
        r=_as_rank(r) or 0,
        lora_alpha=float(alpha),
        use_rslora=bool(rslora),
        base_model_name_or_path=base,
        rank_pattern=_patterns(
            file, config, "rank_pattern", _as_rank, f"integers in 1..{MAX_RANK}"
        ),
        alpha_pattern=_patterns(
            file,
            config,
            "alpha_pattern",
            lambda v: float(v) if _positive_finite(v) else None,
            "positive finite numbers",
        ),
    )


def _as_rank(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value) if 1 <= value <= MAX_RANK else None


def _positive_finite(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _patterns(file: Path, config: dict[str, Any], key: str, convert, want: str) -> list:
    patterns = config.get(key)
    if patterns is None:
        return []
    if not isinstance(patterns, dict):
        raise AdapterFormatError(
            f"{file}: {key} must be an object mapping module patterns to values, "
            f"got {type(patterns).__name__}",
            key,
        )
    if len(patterns) > MAX_PATTERNS:
        raise AdapterFormatError(f"{file}: {key} has more than {MAX_PATTERNS} keys", key)
    out = []
    for pattern, value in patterns.items():
        converted = convert(value)
        if converted is None:
            raise AdapterFormatError(
                f"{file}: {key}[{pattern!r:.80}] must be {want}, got {value!r:.60}", key
            )
        try:
            out.append((ModulePattern(pattern), converted))
        except PatternError as e:
            raise AdapterFormatError(f"{file}: {key} key {pattern!r:.80} {e}", key) from e
    return out
