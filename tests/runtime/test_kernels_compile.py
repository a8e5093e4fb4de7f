"""The kernels compile for real GPUs (Hopper, Ampere) even where none is present, and every
launch config in the tables neither spills registers nor overfills an SM.

The interpreter runs a kernel's Python, not the compiler: a type or layout error that only
the compiler sees would first show up on the GPU machine. Triton compiles to cubin without
a device (it ships ptxas), so CI compiles every (phase, dtype) entry of SHRINK_CONFIGS,
EXPAND_CONFIGS and EXPAND_GROUP_CONFIGS ahead of time, with ptxas's log: spilled registers go
to local memory, and a config whose `programs_per_sm` cannot all be resident at once turns the
persistent grid into waves. It runs in a subprocess because with TRITON_INTERPRET=1 set (conftest) @triton.jit is
interpreted.
"""

from __future__ import annotations

import os
import subprocess
import sys

COMPILE = r"""
import contextlib
import io
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from loraplane.runtime.kernels.lora_expand import BLOCK_N, EXPAND_CONFIGS, _lora_expand_kernel
from loraplane.runtime.kernels.lora_expand_group import (
    EXPAND_GROUP_CONFIGS,
    _lora_expand_group_kernel,
)
from loraplane.runtime.kernels.lora_shrink import BLOCK_K, BLOCK_R, SHRINK_CONFIGS, _lora_shrink_kernel

# Per SM: 64K 32-bit registers on both; shared memory 228 KB on sm90, 164 KB on sm80.
SM = {90: 228 * 1024, 80: 164 * 1024}
DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
BLOCK_M = {"decode": 16, "prefill": 64}

# Strides of contiguous last dimensions: always 1 when the launchers call the kernels, and
# Triton compiles an int argument equal to 1 as the constant 1 (fewer registers: an address
# add is folded). Compiled here as they run, or the counts below would not be the real ones.
UNIT_STRIDES = {"stride_xk", "stride_ak", "stride_or", "stride_hr", "stride_br", "stride_yn"}

def source(fn, pointers, constexprs):
    constexprs = constexprs | {name: 1 for name in fn.arg_names if name in UNIT_STRIDES}
    return ASTSource(fn, signature(fn, pointers, constexprs), constexprs=constexprs)

def signature(fn, pointers, constexprs):
    return {
        name: "constexpr" if name in constexprs else pointers.get(name, "i32")
        for name in fn.arg_names
    }

def compile_checked(what, src, arch, config):
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
        kernel = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
    text = log.getvalue()
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", text).group(1))
    threads = 32 * config.num_warps
    resident_regs = config.programs_per_sm * threads * -(-regs // 8) * 8  # allocated by 8
    smem = config.programs_per_sm * kernel.metadata.shared
    print(f"compiled sm{arch} {what} {config}: {regs} registers, {spills} B spilled, "
          f"{kernel.metadata.shared} B shared", file=sys.stderr)
    problems = []
    if spills:
        problems.append(f"spills {spills} B")
    if resident_regs > 65536:
        problems.append(f"{config.programs_per_sm} programs need {resident_regs} registers")
    if smem > SM[arch]:
        problems.append(f"{config.programs_per_sm} programs need {smem} B of shared memory")
    if problems:
        print(f"BAD sm{arch} {what}: {'; '.join(problems)}: change the table", file=sys.stderr)

index = {
    p: "*i32"
    for p in ("ranks_ptr", "sorted_ptr", "tile_slot_ptr", "tile_start_ptr", "tile_end_ptr", "num_live_ptr")
}
for arch in (90, 80):
    for (phase, dtype), config in SHRINK_CONFIGS.items():
        dt = DTYPE[dtype]
        c = {"BLOCK_M": BLOCK_M[phase], "BLOCK_R": BLOCK_R, "BLOCK_K": BLOCK_K, "IEEE": dt == "fp32"}
        p = index | {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "out_ptr": "*fp32"}
        src = source(_lora_shrink_kernel, p, c)
        compile_checked(f"shrink {phase} {dt}", src, arch, config)
    for (phase, dtype), config in EXPAND_CONFIGS.items():
        dt = DTYPE[dtype]
        c = {"BLOCK_M": BLOCK_M[phase], "BLOCK_N": BLOCK_N, "BLOCK_R": BLOCK_R, "IEEE": dt == "fp32"}
        p = index | {"h_ptr": "*fp32", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", "scales_ptr": "*fp32"}
        src = source(_lora_expand_kernel, p, c)
        compile_checked(f"expand {phase} {dt}", src, arch, config)
    for (phase, dtype), config in EXPAND_GROUP_CONFIGS.items():
        dt = DTYPE[dtype]
        c = {"BLOCK_M": BLOCK_M[phase], "BLOCK_N": BLOCK_N, "BLOCK_R": BLOCK_R, "IEEE": dt == "fp32"}
        members = {
            f"{v}{m}_ptr": t
            for m in range(3)
            for v, t in (("y", f"*{dt}"), ("b", f"*{dt}"), ("scales", "*fp32"))
        }
        p = index | members | {"h_ptr": "*fp32"}
        src = source(_lora_expand_group_kernel, p, c)
        compile_checked(f"expand group {phase} {dt}", src, arch, config)
"""


def test_kernels_compile_for_sm90_and_sm80_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # ptxas's log is only written when ptxas runs: compile past Triton's cache.
    env |= {"TRITON_DUMP_PTXAS_LOG": "1", "TRITON_ALWAYS_COMPILE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("compiled sm") == 2 * 3 * 6, done.stderr[-2000:]
    bad = [line for line in done.stderr.splitlines() if line.startswith("BAD")]
    assert not bad, "\n".join(bad)
