"""Which scaled_dot_product_attention kernel torch runs for given inputs, and what each costs.

A decode baseline on the math backend is several times slower than on flash, which would
make every LoRA ratio look better than it is: the benchmarks print the backend they got.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# SDPBackend member → the short name printed; OVERRIDEABLE is for out-of-tree devices.
NAMES = {
    "FLASH_ATTENTION": "flash",
    "EFFICIENT_ATTENTION": "efficient",
    "CUDNN_ATTENTION": "cudnn",
    "MATH": "math",
}


def picked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> str:
    """The backend SDPA's dispatcher chooses for these inputs (flash/efficient/cudnn/math)."""
    return choice(q, k, v, **kwargs)


def choice(*args: Any, **kwargs: Any) -> str:
    from torch.nn.attention import SDPBackend

    # The dispatcher's own choice function (private, but what SDPA itself calls); it takes
    # SDPA's arguments as they are.
    member = SDPBackend(torch._fused_sdp_choice(*args, **kwargs)).name
    return NAMES.get(member, member.lower())


def picked_in(fn: Callable[[], Any]) -> str:
    """The backend of every SDPA call fn makes (joined by '+' when they differ).

    Read at dispatch: a call that reaches the dispatcher whole (inference mode) is asked
    which kernel it gets; otherwise the fused kernel's own op shows, and math shows none.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    found: list[str] = []
    sdpa = torch.ops.aten.scaled_dot_product_attention.default

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = str(func)
            short = None
            if func is sdpa:
                short = choice(*args, **kwargs)
            elif "_scaled_dot_product_" in name:
                short = next((s for s in NAMES.values() if s in name), name)
            if short and short not in found:
                found.append(short)
            return func(*args, **kwargs)

    with Spy():
        fn()
    return "+".join(found) or "math (no fused SDPA op dispatched)"


def each_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, time_ms: Callable, **kwargs: Any
) -> dict[str, str]:
    """Every backend forced in turn: its time, or why torch refused it (first line)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for member, short in NAMES.items():
        backend = getattr(SDPBackend, member, None)
        if backend is None:
            out[short] = "absent in this torch"
            continue
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel(backend):  # also around the timing: it picks at each call
                    F.scaled_dot_product_attention(q, k, v, **kwargs)
                    ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, **kwargs))
                out[short] = f"{ms * 1e3:8.1f} us"
            except Exception as err:  # a refusal is a RuntimeError; anything else, say so too
                # torch says why in UserWarnings ("... not used because ...") before raising.
                why = [str(w.message) for w in seen if "because" in str(w.message)]
                out[short] = "refused: " + one_line(why[0] if why else str(err), 90)
    return out


def one_line(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
