"""q/k/v and gate/up in one expand launch: lora_expand_group against the per-member kernel and
reference, and `project`, which our decoder calls, against the modules called one by one."""

from __future__ import annotations

import importlib
import random

import pytest
import torch
from test_kernels import DEVICE, TOL, fresh_seed, rel_err
from test_kernels_grid import EVERY_ITEM, GridRecorder, programs
from test_model import run_flat

from loraplane.runtime.config import DEFAULT_TARGETS
from loraplane.runtime.kernels import lora_expand, lora_expand_ref, segment_tiles
from loraplane.runtime.kernels.lora_expand import BLOCK_N
from loraplane.runtime.kernels.lora_expand_group import (
    EXPAND_GROUP_CONFIGS,
    expand_group_programs,
    lora_expand_group,
)
from loraplane.runtime.kernels.lora_shrink import lora_shrink, lora_shrink_ref
from loraplane.runtime.lora import group as group_module
from loraplane.runtime.lora import inject_lora, layer, read_peft_adapter
from loraplane.runtime.lora.layer import project
from loraplane.runtime.model import load_model

# Imported by path: the package re-exports launchers under their modules' names.
expand_module = importlib.import_module("loraplane.runtime.kernels.lora_expand_group")
MIXES = ("one-token-per-slot", "one-slot-all-tokens", "some-none", "rank-0-member")


def draw(mix: str, members: int, seed: int) -> dict:
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    num_slots, r_max = rng.randint(3, 9), rng.choice([8, 16, 40])
    if mix == "one-token-per-slot":
        num_slots = rng.randint(17, 33)
        slots = torch.randperm(num_slots, generator=gen)
    elif mix == "one-slot-all-tokens":
        slots = torch.full((rng.randint(40, 100),), rng.randrange(num_slots))
    else:
        slots = torch.randint(-1, num_slots, (rng.randint(10, 60),), generator=gen)
    ranks = torch.randint(1, r_max + 1, (members, num_slots), generator=gen, dtype=torch.int32)
    if mix == "rank-0-member":
        ranks[rng.randrange(members), : num_slots // 2] = 0  # adapters that skip one member
    # q 64 / k, v 16 style: members of different widths, not all a multiple of a block.
    d_outs = [64, 16, 16][:members] if rng.random() < 0.5 else rng.sample([24, 64, 130], members)
    return {
        "num_slots": num_slots,
        "r_max": r_max,
        "rows": -(-r_max // 16) * 16 + rng.choice([0, 16]),
        "ranks": ranks.to(DEVICE),
        "slots": slots.to(torch.int32).to(DEVICE),
        "block_m": rng.choice([4, 16, 64]),
        "d_outs": d_outs,
        "splits": rng.randint(1, 2),
    }


def group_inputs(c: dict, dtype: torch.dtype, gen: torch.Generator) -> tuple:
    """h with NaN outside each member's live columns (never read), y0, B and scales per member."""
    s, r, t, rows = c["num_slots"], c["r_max"], len(c["slots"]), c["rows"]
    members = len(c["d_outs"])
    h = torch.full((c["splits"], t, members * rows), float("nan"))
    for m in range(members):
        h[:, :, m * rows : m * rows + r] = torch.randn(c["splits"], t, r, generator=gen)
    y0 = [torch.randn(t, d, generator=gen).to(dtype).to(DEVICE) for d in c["d_outs"]]
    bs = [torch.randn(s, d, r, generator=gen).to(dtype).to(DEVICE) for d in c["d_outs"]]
    scales = [(torch.rand(s, generator=gen) * 2).to(DEVICE) for _ in c["d_outs"]]
    return h.to(DEVICE), y0, bs, scales


@pytest.mark.parametrize("members", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", MIXES)
def test_group_expand_equals_each_members_expand(mix, dtype, members):
    """Bit for bit the per-member kernel (same items, same sums) with 3 or one program per
    item, and within tolerance of the float64 reference; tokens without a live rank untouched."""
    seed = fresh_seed()
    c = draw(mix, members, seed)
    ctx = f"seed={seed} mix={mix} dtype={dtype} d_outs={c['d_outs']}"
    h, y0, bs, scales = group_inputs(c, dtype, torch.Generator().manual_seed(seed))
    ranks, slots, r, rows = c["ranks"], c["slots"], c["r_max"], c["rows"]
    tiles = segment_tiles(slots, c["num_slots"], c["block_m"])
    want = []
    for m in range(members):
        hm = h[:, :, m * rows : m * rows + r]
        want.append(lora_expand(y0[m].clone(), hm, bs[m], ranks[m], scales[m], tiles, block_n=32))
    for n in (3, EVERY_ITEM):  # 1 program: in the exactly-once test
        ys = [y.clone() for y in y0]
        lora_expand_group(ys, h, bs, ranks, scales, tiles, block_n=32, config=programs(n))
        for m in range(members):
            assert torch.equal(ys[m], want[m]), f"member {m}, {n} programs; {ctx}"
    ts = slots.long()
    for m in range(members):
        hm = h[:, :, m * rows : m * rows + r].sum(0).double().nan_to_num()
        ref = lora_expand_ref(y0[m].double(), hm, bs[m].double(), ranks[m], scales[m].double(), ts)
        if (ref != y0[m].double()).any():
            assert rel_err(want[m], ref) < TOL[dtype], f"member {m}; {ctx}"
        untouched = (slots < 0) | (ranks[m][slots.clamp(min=0).long()] == 0)
        assert torch.equal(want[m][untouched], y0[m][untouched]), f"member {m}; {ctx}"


@pytest.mark.parametrize("n", [1, 3, EVERY_ITEM])
@pytest.mark.parametrize("mix", MIXES)
def test_group_expand_adds_each_item_exactly_once(mix, n):
    """h and B all ones: each cell of member m gets splits * rank_m * scale_m, exact in fp32."""
    seed = fresh_seed()
    c = draw(mix, 3, seed)
    s, t, rows, splits = c["num_slots"], len(c["slots"]), c["rows"], c["splits"]
    ranks, slots = c["ranks"], c["slots"]
    tiles = segment_tiles(slots, s, c["block_m"])
    h = torch.ones(splits, t, 3 * rows, device=DEVICE)
    bs = [torch.ones(s, d, c["r_max"], device=DEVICE) for d in c["d_outs"]]
    scales = [torch.arange(1, s + 1, device=DEVICE) * (m + 1.0) for m in range(3)]
    ys = [torch.zeros(t, d, device=DEVICE) for d in c["d_outs"]]
    lora_expand_group(ys, h, bs, ranks, scales, tiles, block_n=32, config=programs(n))
    index = slots.clamp(min=0).long()
    for m, y in enumerate(ys):
        per_token = torch.where(slots >= 0, splits * ranks[m][index] * scales[m][index], 0.0)
        want = per_token[:, None].expand_as(y)
        wrong = int((y != want).sum())
        assert wrong == 0, f"member {m}: {wrong} cells wrong; seed={seed} mix={mix} n={n}"


def test_group_expand_refuses_mismatched_members():
    tiles = segment_tiles(torch.tensor([0, 1], dtype=torch.int32), 2, 16)
    h = torch.zeros(1, 2, 2 * 16)
    ys = [torch.zeros(2, 8), torch.zeros(2, 4)]
    bs = [torch.zeros(2, 8, 16), torch.zeros(2, 4, 16)]
    ranks, scales = torch.zeros(2, 2, dtype=torch.int32), [torch.zeros(2)] * 2
    lora_expand_group(ys, h, bs, ranks, scales, tiles)
    with pytest.raises(AssertionError):
        lora_expand_group(ys, h, bs[::-1], ranks, scales, tiles)  # B of another width
    with pytest.raises(AssertionError):
        lora_expand_group(ys, h[:, :, :16], bs, ranks, scales, tiles)  # h of one member
    with pytest.raises(AssertionError):
        lora_expand_group(ys, h, bs, ranks[:1], scales, tiles)


def test_group_launch_grid_is_the_one_its_function_reports(monkeypatch):
    kernel = GridRecorder(expand_module._lora_expand_group_kernel)
    monkeypatch.setattr(expand_module, "_lora_expand_group_kernel", kernel)
    slots = torch.arange(60, dtype=torch.int32) % 30
    tiles = segment_tiles(slots, 30, 16)
    d_outs = (300, 40, 40)
    ys = [torch.zeros(60, d) for d in d_outs]
    bs = [torch.zeros(30, d, 16) for d in d_outs]
    ranks, scales = torch.zeros(3, 30, dtype=torch.int32), [torch.zeros(30)] * 3
    lora_expand_group(ys, torch.zeros(1, 60, 48), bs, ranks, scales, tiles)
    config = EXPAND_GROUP_CONFIGS[("decode", torch.float32)]
    want = expand_group_programs(tiles, d_outs, BLOCK_N[tiles.phase], torch.device("cpu"), config)
    assert kernel.grids == [(want,)] and want == config.programs_per_sm


class Launches:
    """Counts the LoRA kernel launches made through the layers and groups."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[str] = []
        for module, name in (
            (layer, "lora_shrink"),
            (group_module, "lora_shrink"),
            (layer, "lora_expand"),
            (layer, "lora_expand_group"),
        ):
            monkeypatch.setattr(module, name, self.counting(name, getattr(module, name)))

    def counting(self, name, fn):
        def launch(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)

        return launch

    def count(self, name: str) -> int:
        return self.calls.count(name)


@pytest.fixture
def llama_with_lora(lora_models):
    base_dir, adapters = lora_models("llama")
    model = load_model(base_dir).to(DEVICE)
    cfg = model.config
    shape = (cfg.num_layers, 64, cfg.num_kv_heads, cfg.head_dim)
    model.attach_kv_cache(torch.zeros(shape, device=DEVICE), torch.zeros(shape, device=DEVICE))
    bank = inject_lora(model, DEFAULT_TARGETS, max_slots=4, max_rank=16, backend="triton")
    for slot, path in enumerate(adapters.values()):
        bank.load(slot, read_peft_adapter(path))
    return model, bank


def test_decoder_layer_launches_one_expand_per_group(llama_with_lora, monkeypatch):
    """Our decoder: 8 LoRA launches a layer (4 shrinks, 2 group expands, o and down), not 11,
    with the logits of the per-member path (the torch backend, which PEFT checks)."""
    model, bank = llama_with_lora
    seqs = [[5, 6, 7, 8], [9, 3], [4, 4, 4]]
    bank.set_batch(torch.tensor([0, 1, 2, 3, 3, -1, 1, 2, 0], dtype=torch.int32))
    launches = Launches(monkeypatch)
    with torch.inference_mode():
        got = run_flat(model, seqs, [0, 0, 0], {})
        per_layer = {n: launches.count(n) / model.config.num_layers for n in set(launches.calls)}
        assert per_layer == {"lora_shrink": 4, "lora_expand": 2, "lora_expand_group": 2}
        bank.backend = "torch"
        bank.set_batch(torch.tensor([0, 1, 2, 3, 3, -1, 1, 2, 0], dtype=torch.int32))
        want = run_flat(model, seqs, [0, 0, 0], {})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_project_equals_the_members_called_one_by_one(llama_with_lora, monkeypatch):
    """What HF models do (each member on its own, sharing the shrink through the step) and
    `project` give the same bits; anything but a whole group in order runs module by module."""
    model, bank = llama_with_lora
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    qkv, gate_up = (attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)
    x = torch.randn(6, model.config.hidden_size, device=DEVICE)
    launches = Launches(monkeypatch)
    with torch.inference_mode():
        bank.set_batch(torch.tensor([3, 0, -1, 1, 2, 3], dtype=torch.int32))
        for modules in (qkv, gate_up):
            one_by_one = [m(x) for m in modules]
            assert launches.count("lora_expand") == len(modules), launches.calls
            launches.calls.clear()
            fused = project(x, *modules)
            assert launches.calls == ["lora_shrink", "lora_expand_group"]
            launches.calls.clear()
            for a, b in zip(fused, one_by_one, strict=True):
                assert torch.equal(a, b)
        for modules in (qkv[::-1], qkv[:2], (*qkv, attn.o_proj), (torch.nn.Identity(),)):
            project(x, *modules)
            assert "lora_expand_group" not in launches.calls, modules
        bank.set_batch(torch.tensor([-1] * 6, dtype=torch.int32))  # no adapter: base only
        launches.calls.clear()
        assert torch.equal(project(x, *qkv)[0], qkv[0].base(x)) and not launches.calls


# Llama-3-8B's grouped projections: (d_in, d_out).
LLAMA3_8B_GROUPS = {
    "qkv": (4096, (4096, 1024, 1024)),
    "gate_up": (4096, (14336, 14336)),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_llama3_8b_groups_match_reference_from_one_cuda_graph(dtype):
    """64 decode tokens, 64 slots of rank <= 16: each group's shrink and one group expand,
    captured once and replayed with mixes whose live tile counts differ."""
    gen = torch.Generator(device="cuda").manual_seed(14)
    tokens, num_slots, max_rank, rows = 64, 64, 16, 16
    cases = {}
    for name, (d_in, d_outs) in LLAMA3_8B_GROUPS.items():
        members = len(d_outs)
        a = torch.randn(num_slots, members * rows, d_in, device="cuda", generator=gen) * d_in**-0.5
        ranks = torch.randint(0, max_rank + 1, (members, num_slots), device="cuda", generator=gen)
        ranks = ranks.to(torch.int32)
        ranks[:, 5] = max_rank  # the shared adapter targets every member
        cases[name] = {
            "x": torch.randn(tokens, d_in, device="cuda", generator=gen).to(dtype),
            "a": a.to(dtype),
            "ranks": ranks,
            "bs": [
                torch.randn(num_slots, d, max_rank, device="cuda", generator=gen).to(dtype)
                for d in d_outs
            ],
            "scales": [torch.rand(num_slots, device="cuda", generator=gen) for _ in d_outs],
            "y0": [torch.randn(tokens, d, device="cuda", generator=gen).to(dtype) for d in d_outs],
        }
    ys = {name: [y.clone() for y in c["y0"]] for name, c in cases.items()}
    static = torch.full((tokens,), -1, dtype=torch.int32, device="cuda")

    def run() -> None:
        tiles = segment_tiles(static, num_slots, 16)
        for name, c in cases.items():
            h = lora_shrink(c["x"], c["a"], c["ranks"], tiles)
            lora_expand_group(ys[name], h, c["bs"], c["ranks"], c["scales"], tiles)

    run()  # compile and warm up outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()

    distinct = torch.randperm(num_slots, device="cuda", generator=gen)[:tokens].cpu()
    for mix_name, mix in (
        ("one shared", torch.full((tokens,), 5)),
        ("distinct", distinct),
        ("half none", torch.where(torch.arange(tokens) % 2 == 0, distinct, -1)),
    ):
        static.copy_(mix.to(torch.int32))
        for name, c in cases.items():
            for y, y0 in zip(ys[name], c["y0"], strict=True):
                y.copy_(y0)
        graph.replay()
        torch.cuda.synchronize()
        ts = static.long()
        for name, c in cases.items():
            for m, (y, y0) in enumerate(zip(ys[name], c["y0"], strict=True)):
                cols = slice(m * rows, m * rows + max_rank)
                h = lora_shrink_ref(c["x"].double(), c["a"][:, cols].double(), c["ranks"][m], ts)
                want = lora_expand_ref(
                    y0.double(), h, c["bs"][m].double(), c["ranks"][m], c["scales"][m].double(), ts
                )
                err = rel_err(y, want)
                assert err < TOL[dtype], f"{mix_name}: {name}[{m}] relative error {err:.2e}"
                untouched = (ts < 0) | (c["ranks"][m][ts.clamp(min=0)] == 0)
                assert torch.equal(y[untouched], y0[untouched]), (mix_name, name, m)


def test_injection_fuses_each_groups_base_weights(lora_models, monkeypatch):
    """q/k/v and gate/up weights become rows of one tensor at injection: the same parameters
    and values under the same names, one GEMM per group, and a member whose weight was
    replaced since (moved, re-assigned) makes its group run its GEMMs apart again."""
    base_dir, _ = lora_models("llama")
    model = load_model(base_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bank = inject_lora(model, DEFAULT_TARGETS, max_slots=2, max_rank=8, backend="triton")
    after = model.state_dict()
    assert [k.replace(".base", "") for k in after] == list(before)
    for k, v in after.items():
        assert torch.equal(v, before[k.replace(".base", "")]), k
    attn = model.model.layers[0].self_attn
    qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
    group = qkv[0].group
    assert group is not None and group.weight is not None
    assert all(m.weight.untyped_storage().data_ptr() == group.weight.data_ptr() for m in qkv)
    assert len(bank.groups) == 2 * model.config.num_layers
    linears = []

    def counting(*args, **kwargs):
        linears.append(args[1].shape)
        return torch_linear(*args, **kwargs)

    torch_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    x = torch.randn(5, model.config.hidden_size)
    with torch.inference_mode():
        bank.set_batch(torch.tensor([-1] * 5))
        fused = project(x, *qkv)
        assert linears == [(sum(group.widths), x.shape[1])]
        apart = [m(x) for m in qkv]
        torch.testing.assert_close(fused, tuple(apart), rtol=1e-6, atol=1e-6)
        attn.k_proj.base.weight = torch.nn.Parameter(attn.k_proj.weight.clone())
        linears.clear()
        torch.testing.assert_close(project(x, *qkv), tuple(apart), rtol=1e-6, atol=1e-6)
        assert len(linears) == 3
