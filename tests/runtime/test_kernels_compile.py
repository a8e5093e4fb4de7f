"""The kernels compile for real GPUs (Hopper, Ampere) even where none is present, and every
launch config in the tables neither spills registers nor overfills an SM.

The interpreter runs a kernel's Python, not the compiler: a type or layout error that only
the compiler sees would first show up on the GPU machine. Triton compiles to cubin without
a device (it ships ptxas), so CI compiles every (phase, dtype) entry of SHRINK_CONFIGS,
EXPAND_CONFIGS and EXPAND_GROUP_CONFIGS ahead of time, with ptxas's log: spilled registers go
to local memory, and a config whose `programs_per_sm` cannot all be resident at once turns the
persistent grid into waves. The paged attention kernels (decode split and reduce, varlen
prefill) are compiled the same way at the head sizes of common models (64, 128, 256). It runs
in a subprocess because with TRITON_INTERPRET=1 set (conftest) @triton.jit is interpreted.

LORAPLANE_COMPILE_ARCHS=90 compiles for Hopper only (bench/image_stack.sh, with the GPU
image's Triton, whose sm_80 code differs and is not what the GPU machine runs).
"""

from __future__ import annotations

import os
import subprocess
import sys

PRELUDE = r"""
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
ARCHS = [int(a) for a in sys.argv[1].split(",")]
DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
BLOCK_M = {"decode": 16, "prefill": 64}

# Strides of contiguous last dimensions: always 1 when the launchers call the kernels, and
# Triton compiles an int argument equal to 1 as the constant 1 (fewer registers: an address
# add is folded). Compiled here as they run, or the counts below would not be the real ones.
UNIT_STRIDES = {"stride_xk", "stride_ak", "stride_or", "stride_hr", "stride_br", "stride_yn"}

# aligned: arguments Triton's launcher sees as multiples of 16 (pointers, strides) and so
# compiles with that hint, as it does at run time: row loads then vectorise.
def source(fn, pointers, constexprs, aligned=()):
    constexprs = constexprs | {name: 1 for name in fn.arg_names if name in UNIT_STRIDES}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in aligned}
    return ASTSource(fn, signature(fn, pointers, constexprs), constexprs=constexprs, attrs=attrs)

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
"""

LORA = r"""
index = {
    p: "*i32"
    for p in ("ranks_ptr", "sorted_ptr", "tile_slot_ptr", "tile_start_ptr", "tile_end_ptr", "num_live_ptr")
}
for arch in ARCHS:
    for (phase, dtype), config in SHRINK_CONFIGS.items():
        dt = DTYPE[dtype]
        c = {"BLOCK_M": BLOCK_M[phase], "BLOCK_R": BLOCK_R, "BLOCK_K": BLOCK_K, "IEEE": dt == "fp32"}
        p = index | {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "out_ptr": "*fp32"}
        src = source(_lora_shrink_kernel, p, c)
        compile_checked(f"shrink {phase} {dt}", src, arch, config)
    for (phase, dtype), config in EXPAND_CONFIGS.items():
        dt = DTYPE[dtype]
        c = {"BLOCK_M": BLOCK_M[phase], "BLOCK_N": BLOCK_N[phase], "BLOCK_R": BLOCK_R, "IEEE": dt == "fp32"}
        p = index | {"h_ptr": "*fp32", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", "scales_ptr": "*fp32"}
        src = source(_lora_expand_kernel, p, c)
        compile_checked(f"expand {phase} {dt}", src, arch, config)
    for (phase, dtype), config in EXPAND_GROUP_CONFIGS.items():
        dt = DTYPE[dtype]
        c = {"BLOCK_M": BLOCK_M[phase], "BLOCK_N": BLOCK_N[phase], "BLOCK_R": BLOCK_R, "IEEE": dt == "fp32"}
        members = {
            f"{v}{m}_ptr": t
            for m in range(3)
            for v, t in (("y", f"*{dt}"), ("b", f"*{dt}"), ("scales", "*fp32"))
        }
        p = index | members | {"h_ptr": "*fp32"}
        src = source(_lora_expand_group_kernel, p, c)
        compile_checked(f"expand group {phase} {dt}", src, arch, config)
"""

# Llama-3-8B's attention (32 query heads over 8 kv heads) at head sizes 64, 128 and 256, with
# strides as the model passes them: q, k and v are views of [tokens, heads, d] projections and
# the cache is [positions, kv_heads, d], so their strides are multiples of 16 and their
# pointers 16-byte aligned. Block tables and context lengths are sliced per phase and get no
# hint. One program per SM is what must fit; more is occupancy, not correctness.
PAGED = r"""
from triton.compiler.compiler import make_backend

from loraplane.runtime.kernels.paged_common import _block_d
from loraplane.runtime.kernels.paged_decode import (
    MIN_GROUP_ROWS,
    _decode_reduce_kernel,
    _decode_split_kernel,
    decode_tiles,
)
from loraplane.runtime.kernels.paged_prefill import _prefill_kernel, prefill_tiles
from loraplane.runtime.kernels.segments import LaunchConfig

GROUP, CACHE_BLOCK = 32 // 8, 16  # Llama-3-8B: 32 query heads over 8 kv heads
STAGES = make_backend(GPUTarget("cuda", 90, 32)).parse_options({}).num_stages  # launch default
ROWS = {"q_ptr", "k_ptr", "v_ptr", "out_ptr", "part_ptr", "lse_ptr"}
ROW_STRIDES = {"stride_qs", "stride_qh", "stride_kp", "stride_kh", "stride_vp", "stride_vh",
               "stride_os", "stride_oh", "stride_qt", "stride_ot", "stride_ps", "stride_ph",
               "stride_pp"}

def launch(num_warps):  # the paged kernels launch with Triton's default stages, one grid wave
    return LaunchConfig(num_warps=num_warps, num_stages=STAGES, programs_per_sm=1)

def tensors(dt, *names):
    return {n: "*i32" if n in ("tables_ptr", "ctx_ptr", "qsl_ptr") else
            "*fp32" if n in ("part_ptr", "lse_ptr") else f"*{dt}" for n in names} | {"qk_scale": "fp32"}

for arch in ARCHS:
    for dt in ("bf16", "fp32"):
        ieee = dt == "fp32"
        # fp32 runs the GPU tests' tiny models (exactness): a tiny head and 8B's.
        for d in ((32, 128) if ieee else (64, 128, 256)):
            bd = _block_d(d)
            common = {"GROUP": GROUP, "HEAD_DIM": d, "CACHE_BLOCK": CACHE_BLOCK, "IEEE": ieee}
            ptrs = tensors(dt, "q_ptr", "k_ptr", "v_ptr", "tables_ptr", "ctx_ptr", "out_ptr",
                           "part_ptr", "lse_ptr")
            block_n, warps = decode_tiles(ieee)
            for splits, window in ((1, 0), (8, 0), (8, 4096)):
                c = common | {"WINDOW": window, "NUM_SPLITS": splits,
                              "BLOCK_G": max(MIN_GROUP_ROWS, GROUP), "BLOCK_N": block_n,
                              "BLOCK_D": bd}
                src = source(_decode_split_kernel, ptrs, c, ROWS | ROW_STRIDES)
                compile_checked(f"paged decode d={d} splits={splits} window={window} {dt}",
                                src, arch, launch(warps))
            c = {"HEAD_DIM": d, "NUM_SPLITS": 8, "BLOCK_S": 8, "BLOCK_D": bd}
            src = source(_decode_reduce_kernel, tensors(dt, "part_ptr", "lse_ptr", "out_ptr"), c,
                         ROWS | ROW_STRIDES)
            compile_checked(f"paged reduce d={d} {dt}", src, arch, launch(4))
            block_m, block_n, warps = prefill_tiles(GROUP, d, ieee)
            ptrs = tensors(dt, "q_ptr", "k_ptr", "v_ptr", "tables_ptr", "qsl_ptr", "ctx_ptr",
                           "out_ptr")
            for window in (0, 4096):
                c = common | {"WINDOW": window, "BLOCK_Q": block_m // GROUP, "BLOCK_M": block_m,
                              "BLOCK_N": block_n, "BLOCK_D": bd}
                src = source(_prefill_kernel, ptrs, c, ROWS | ROW_STRIDES)
                compile_checked(f"paged prefill d={d} window={window} {dt}", src, arch,
                                launch(warps))
"""


COMPILE_ARCHS = os.environ.get("LORAPLANE_COMPILE_ARCHS", "90,80")


def compile_all(body: str, per_arch: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # ptxas's log is only written when ptxas runs: compile past Triton's cache.
    env |= {"TRITON_DUMP_PTXAS_LOG": "1", "TRITON_ALWAYS_COMPILE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + body, COMPILE_ARCHS],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    expected = per_arch * len(COMPILE_ARCHS.split(","))
    assert done.stderr.count("compiled sm") == expected, done.stderr[-2000:]
    bad = [line for line in done.stderr.splitlines() if line.startswith("BAD")]
    assert not bad, "\n".join(bad)


def test_lora_kernels_compile_for_sm90_and_sm80_without_spills():
    compile_all(LORA, 3 * 6)


def test_paged_attention_compiles_for_sm90_and_sm80_without_spills():
    # bf16 at three head sizes and fp32 at two, each 3 decode + 1 reduce + 2 prefill
    compile_all(PAGED, (3 + 2) * 6)
