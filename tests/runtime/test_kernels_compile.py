"""The kernels compile for real GPUs (Hopper, Ampere) even where none is present.

The interpreter runs a kernel's Python, not the compiler: a type or layout error that only
the compiler sees would first show up on the GPU machine. Triton compiles to cubin without
a device (it ships ptxas), so CI compiles every dtype and tile variant ahead of time. It runs
in a subprocess because with TRITON_INTERPRET=1 set (conftest) @triton.jit is interpreted.
"""

from __future__ import annotations

import os
import subprocess
import sys

COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from loraplane.runtime.kernels.lora_expand import BLOCK_N, _lora_expand_kernel
from loraplane.runtime.kernels.lora_shrink import BLOCK_K, BLOCK_R, _lora_shrink_kernel

def signature(fn, pointers, constexprs):
    return {
        name: "constexpr" if name in constexprs else pointers.get(name, "i32")
        for name in fn.arg_names
    }

index = {p: "*i32" for p in ("ranks_ptr", "sorted_ptr", "tile_slot_ptr", "tile_start_ptr", "tile_end_ptr")}
for arch in (90, 80):
    for dt in ("bf16", "fp16", "fp32"):
        for block_m in (16, 64):
            ieee = dt == "fp32"
            c = {"BLOCK_M": block_m, "BLOCK_R": BLOCK_R, "BLOCK_K": BLOCK_K, "IEEE": ieee}
            p = index | {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "out_ptr": "*fp32"}
            src = ASTSource(_lora_shrink_kernel, signature(_lora_shrink_kernel, p, c), constexprs=c)
            triton.compile(src, target=GPUTarget("cuda", arch, 32))
            c = {"BLOCK_M": block_m, "BLOCK_N": BLOCK_N, "BLOCK_R": BLOCK_R, "IEEE": ieee}
            p = index | {"h_ptr": "*fp32", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", "scales_ptr": "*fp32"}
            src = ASTSource(_lora_expand_kernel, signature(_lora_expand_kernel, p, c), constexprs=c)
            triton.compile(src, target=GPUTarget("cuda", arch, 32))
            print("compiled", arch, dt, block_m, file=sys.stderr)
"""


def test_kernels_compile_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("compiled") == 12, done.stderr[-2000:]
