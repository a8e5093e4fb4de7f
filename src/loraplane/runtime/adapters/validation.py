"""Does an adapter fit the base model this runtime serves? Each refusal names what and why."""

from __future__ import annotations

from pathlib import PurePosixPath

from loraplane.runtime.adapters.errors import Incompatible
from loraplane.runtime.lora import AdapterWeights


def _normalize(name: str) -> str:
    for prefix in ("hf://", "file://", "pvc://", "s3://"):
        name = name.removeprefix(prefix)
    return name.split("@", 1)[0].rstrip("/")


def base_matches(adapter_base: str | None, our_names: set[str]) -> bool:
    """True when unknown on either side, or when names agree in full or in their last part.

    A hub id ("org/Model-7B") and a local copy of it ("/models/Model-7B") are the same model
    for our purposes; comparing the last path component lets both spellings through.
    """
    if not adapter_base or not our_names:
        return True
    theirs = _normalize(adapter_base)
    ours = {_normalize(n) for n in our_names if n}
    tails = {PurePosixPath(n).name for n in ours}
    return theirs in ours or PurePosixPath(theirs).name in tails


def check_compatible(
    name: str,
    weights: AdapterWeights,
    *,
    base_names: set[str],
    base_modules: set[str],
    lora_modules: set[str],
    max_rank: int,
    shapes: dict[str, tuple[int, int]] | None = None,
) -> None:
    if not base_matches(weights.base_model_name_or_path, base_names):
        raise Incompatible(
            f"adapter {name!r} was trained on {weights.base_model_name_or_path!r}, but this "
            f"runtime serves {sorted(base_names)}; load it into a deployment of that base",
            "base_model_name_or_path",
        )
    if weights.rank > max_rank:
        raise Incompatible(
            f"adapter {name!r} has rank {weights.rank}, above --max-lora-rank {max_rank}; "
            "raise maxLoraRank on the deployment or use a smaller adapter",
            "r",
        )
    missing = sorted(set(weights.modules) - base_modules)
    if missing:
        raise Incompatible(
            f"adapter {name!r} targets modules the base model does not have: {missing[:5]}"
        )
    unwrapped = sorted({m.rsplit(".", 1)[-1] for m in weights.modules if m not in lora_modules})
    if unwrapped:
        raise Incompatible(
            f"adapter {name!r} targets {unwrapped}, which this runtime does not serve LoRA on "
            f"(it wraps {sorted({m.rsplit('.', 1)[-1] for m in lora_modules})})"
        )
    for module, w in sorted(weights.modules.items()):
        d_in, d_out = (shapes or {}).get(module, (w.a.shape[1], w.b.shape[0]))
        if w.a.shape[1] != d_in or w.b.shape[0] != d_out:
            raise Incompatible(
                f"adapter {name!r}: {module} has lora_A {tuple(w.a.shape)} and lora_B "
                f"{tuple(w.b.shape)}, but the base layer maps {d_in} to {d_out} features "
                f"(want [r, {d_in}] and [{d_out}, r]); was it trained on another base?",
                module,
            )
