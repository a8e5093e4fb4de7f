"""Where a kernel benchmark runs: a GPU for numbers, or the CPU under the Triton interpreter to
prove the script runs."""

from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def choose_device(cpu: bool) -> tuple[torch.device, torch.dtype, str]:
    """(device, dtype, the hardware's name); call it before anything imports triton."""
    if cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    import torch

    device = torch.device("cpu" if cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu --tiny to prove the script on a CPU")
    # The interpreter truncates fp32 -> bf16 (see tests/runtime/test_kernels.py): fp32 there.
    dtype = torch.float32 if cpu else torch.bfloat16
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    return device, dtype, name
