"""An almost empty Triton kernel (one store): what a launch costs with no work in it.

Its own module so that bench/probe.py can import it after choosing TRITON_INTERPRET.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _touch_kernel(x_ptr):
    tl.store(x_ptr, 1.0)


def touch(x: torch.Tensor) -> None:
    # x: [>= 1] float32
    _touch_kernel[(1,)](x)
