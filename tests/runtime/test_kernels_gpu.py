"""GPU-only: the kernels at real model shapes, and decode steps captured in one CUDA graph."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from runtime_helpers import LLAMA3_8B
from runtime_helpers import LLAMA3_8B_SHRINKS as GROUPS

from loraplane.runtime.kernels import (
    lora_expand,
    lora_expand_ref,
    lora_shrink,
    lora_shrink_ref,
    segment_tiles,
)
from loraplane.runtime.kernels.lora_shrink import rank_mask
from loraplane.runtime.lora import inject_lora, read_peft_adapter
from loraplane.runtime.lora.batch import choose_block_m

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(got, want) -> float:
    assert not got.isnan().any()
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("tokens", "d_in", "d_out", "distinct", "rank", "r_max"),
    [
        (64, 4096, 4096, 64, 16, 16),  # decode, every sequence its own adapter
        (64, 4096, 14336, 8, 8, 64),  # decode, gate/up-shaped, rank below r_max
        (64, 14336, 4096, 1, 64, 64),  # decode, down-shaped, one shared adapter
        (1000, 4096, 1024, 5, 16, 32),  # prefill segments, k/v-shaped
    ],
)
def test_kernels_at_model_shapes(tokens, d_in, d_out, distinct, rank, r_max, dtype):
    gen = torch.Generator(device="cuda").manual_seed(tokens + d_out + distinct)
    slots = 64
    x = torch.randn(tokens, d_in, device="cuda", generator=gen).to(dtype)
    a = (torch.randn(slots, r_max, d_in, device="cuda", generator=gen) * d_in**-0.5).to(dtype)
    b = torch.randn(slots, d_out, r_max, device="cuda", generator=gen).to(dtype)
    ranks = torch.full((slots,), rank, dtype=torch.int32, device="cuda")
    scales = torch.rand(slots, device="cuda", generator=gen)
    ts = (torch.arange(tokens, device="cuda") % distinct).to(torch.int32)
    ts[::7] = -1
    tiles = segment_tiles(ts, slots, 16 if tokens <= 64 else 64)
    y0 = torch.randn(tokens, d_out, device="cuda", generator=gen).to(dtype)
    h = lora_shrink(x, a, ranks, tiles, out=None)
    y = lora_expand(y0.clone(), h, b, ranks, scales, tiles)
    h_ref = lora_shrink_ref(x.double(), a.double(), ranks, ts)
    y_ref = lora_expand_ref(y0.double(), h_ref, b.double(), ranks, scales.double(), ts)
    assert rel_err(y, y_ref) < TOL[dtype]
    assert torch.equal(y[ts < 0], y0[ts < 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_with_mixed_adapters_replays_from_one_cuda_graph(lora_models, dtype):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from transformers import AutoModelForCausalLM

    from decode_engine import StaticDecoder

    base_dir, adapters = lora_models("llama")
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).cuda().eval()
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    slots = inject_lora(model, targets, max_slots=4, max_rank=16)
    assert slots.use_kernels
    for slot, path in enumerate(adapters.values()):
        slots.load(slot, read_peft_adapter(path))
    batch, ctx = 8, 5
    dec = StaticDecoder(model, batch, max_len=ctx + 1)
    ids = torch.randint(4, 400, (batch, ctx + 1), device="cuda")
    static = torch.full((batch,), -1, dtype=torch.int32, device="cuda")
    tok, pos = ids[:, -1].clone(), torch.full((batch,), ctx, device="cuda")

    with torch.inference_mode():
        slots.set_batch(static)
        for t in range(ctx):  # fill the cache (base only)
            dec.step(ids[:, t], torch.full_like(pos, t))

        def step():
            slots.set_batch(static)  # metadata on the device, inside the graph
            return dec.step(tok, pos)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()

        for mix in ([0, 1, 2, 3, -1, 0, 1, 2], [3] * 8, [-1] * 8, [2, -1, 2, -1, 0, 0, 1, 3]):
            static.copy_(torch.tensor(mix, dtype=torch.int32))
            graph.replay()
            got = out.float().clone()
            slots.backend = "torch"  # the reference path, eager
            slots.set_batch(static)
            want = dec.step(tok, pos).float()
            slots.backend = "auto"
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            assert rel_err(got, want.double()) < tol, mix


def llama3_8b_layer(slots: int, max_rank: int, dtype, gen) -> dict:
    """One decoder layer's adapter slots, A stacked per group as lora/group.py stacks it."""
    rows = -(-max_rank // 16) * 16
    layer = {}
    for group in GROUPS:
        d_in = LLAMA3_8B[group[0]][0]
        a = torch.zeros(slots, len(group) * rows, d_in, device="cuda", dtype=dtype)
        ranks = torch.randint(0, max_rank + 1, (len(group), slots), device="cuda", generator=gen)
        ranks = ranks.to(torch.int32)
        for m, name in enumerate(group):
            a[:, m * rows : m * rows + max_rank] = (
                torch.randn(slots, max_rank, d_in, device="cuda", generator=gen) * d_in**-0.5
            ).to(dtype)
            d_out = LLAMA3_8B[name][1]
            layer[name] = {
                "b": torch.randn(slots, d_out, max_rank, device="cuda", generator=gen).to(dtype),
                "scales": torch.rand(slots, device="cuda", generator=gen),
                "cols": slice(m * rows, m * rows + max_rank),
            }
        layer[group] = {"a": a, "ranks": ranks}
    return layer


def run_layer(layer, xs, ys, token_slots, num_slots) -> None:
    """The kernels' LoRA for every projection of the layer, added into ys in place."""
    tiles = segment_tiles(token_slots, num_slots, choose_block_m(len(token_slots), num_slots))
    for group in GROUPS:
        a, ranks = layer[group]["a"], layer[group]["ranks"]
        h = lora_shrink(xs[group[0]], a, ranks if len(group) > 1 else ranks[0], tiles)
        for m, name in enumerate(group):
            p = layer[name]
            lora_expand(ys[name], h[:, :, p["cols"]], p["b"], ranks[m], p["scales"], tiles)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_llama3_8b_decode_layer_matches_reference_from_one_cuda_graph(dtype):
    """64 decode tokens, 64 slots of rank <= 16: one captured launch set, replayed with mixes
    whose live tile counts differ (the persistent grid reads the count on the device)."""
    gen = torch.Generator(device="cuda").manual_seed(8)
    tokens, num_slots, max_rank = 64, 64, 16
    layer = llama3_8b_layer(num_slots, max_rank, dtype, gen)
    for group in GROUPS:
        layer[group]["ranks"][:, 5] = max_rank  # the shared adapter targets every projection
    d_ins = {LLAMA3_8B[g[0]][0] for g in GROUPS}
    x_by_d = {d: torch.randn(tokens, d, device="cuda", generator=gen).to(dtype) for d in d_ins}
    xs = {g[0]: x_by_d[LLAMA3_8B[g[0]][0]] for g in GROUPS}
    y0 = {
        n: torch.randn(tokens, d, device="cuda", generator=gen).to(dtype)
        for n, (_, d) in LLAMA3_8B.items()
    }
    ys = {n: y.clone() for n, y in y0.items()}
    static = torch.full((tokens,), -1, dtype=torch.int32, device="cuda")

    run_layer(layer, xs, ys, static, num_slots)  # compile and warm up outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run_layer(layer, xs, ys, static, num_slots)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_layer(layer, xs, ys, static, num_slots)

    one_shared = torch.full((tokens,), 5)
    distinct = torch.randperm(num_slots, device="cuda", generator=gen)[:tokens].cpu()
    half_none = torch.where(torch.arange(tokens) % 2 == 0, distinct, -1)
    for mix_name, mix in (
        ("one shared", one_shared),
        ("distinct", distinct),
        ("half none", half_none),
    ):
        static.copy_(mix.to(torch.int32))
        for name in ys:
            ys[name].copy_(y0[name])
        graph.replay()
        torch.cuda.synchronize()
        ts = static.long()
        for group in GROUPS:
            a, ranks = layer[group]["a"], layer[group]["ranks"]
            for m, name in enumerate(group):
                p = layer[name]
                x = xs[group[0]].double()
                h = lora_shrink_ref(x, a[:, p["cols"]].double(), ranks[m], ts)
                want = lora_expand_ref(
                    y0[name].double(), h, p["b"].double(), ranks[m], p["scales"].double(), ts
                )
                err = rel_err(ys[name], want)
                assert err < TOL[dtype], f"{mix_name}: {name} relative error {err:.2e}"
                untouched = ~rank_mask(ranks[m], ts, max_rank).any(1)
                assert torch.equal(ys[name][untouched], y0[name][untouched]), (mix_name, name)
