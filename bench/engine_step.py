"""Decode steps of the runtime's own engine (ModelRunner: paged attention, CUDA graphs, LoRA
slots, the batched sampler) on a random-weight Llama-3-8B-shaped model, side by side in one run.

    python bench/engine_step.py                # GPU, bf16, batch 64, context 512
    python bench/engine_step.py --cpu --tiny   # proves the script on a CPU (Triton interpreter)

Rows, each the same batch decoding from the same context:
  plain        the model without LoRA layers (lora_target_modules empty)
  no adapter   LoRA layers present, no sequence with an adapter (the graph without LoRA)
  1 adapter    every sequence the same rank-16 adapter
  8 / 64       sequences spread over 8 or 64 distinct rank-16 adapters
  eager rows   the same step without CUDA graphs, to show what the graphs buy
Targets (issue 14): no adapter >= 0.98 of plain; 1 adapter >= 0.93 and 64 adapters >= 0.75 of
no adapter. A check first: the graph and eager steps choose the same tokens.
Nothing is downloaded: the model is built from a config with random weights, in place.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import time

from decode import PRESETS as DECODE_PRESETS
from decode import TARGETS

# The same random-weight shapes as decode.py, as HF config fields (our loader reads those).
PRESETS = {name: {"model_type": "llama", **fields} for name, fields in DECODE_PRESETS.items()}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--tiny", action="store_true", help="tiny model and batch (seconds on a CPU)")
    p.add_argument("--batch", type=int, help="sequences per decode step (default 64; tiny 4)")
    p.add_argument("--context", type=int, help="tokens of context per sequence (512; tiny 24)")
    p.add_argument("--steps", type=int, help="timed decode steps per row (48; tiny 3)")
    p.add_argument("--rank", type=int, default=16)
    return p.parse_args()


def build_model(hf: dict, dtype, device):
    import torch

    from loraplane.runtime.model import CausalLM
    from loraplane.runtime.model.config import ModelConfig

    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_hf(hf))
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def random_adapter(runner, rank: int, seed: int):
    import torch

    from loraplane.runtime.lora.weights import AdapterWeights, LoraModuleWeights

    dev = runner.device  # made where they are used: 64 adapters of an 8B model are 5 GB
    gen = torch.Generator(device=dev).manual_seed(seed)
    modules = {}
    for path, (d_in, d_out) in runner.lora_shapes.items():
        a = (torch.randn(rank, d_in, generator=gen, device=dev) * d_in**-0.5).to(runner.dtype)
        b = (torch.randn(d_out, rank, generator=gen, device=dev) * 0.01).to(runner.dtype)
        modules[path] = LoraModuleWeights(a, b, 2.0)
    return AdapterWeights({}, modules, rank, set(TARGETS))


class Batch:
    """batch sequences of `context` random tokens, with blocks for context + steps tokens."""

    def __init__(self, runner, batch: int, context: int, room: int, seed: int) -> None:
        import torch

        from loraplane.runtime.sampling import SamplingParams
        from loraplane.runtime.sequence import Sequence

        gen = torch.Generator().manual_seed(seed)
        bs = runner.config.block_size
        per_seq = -(-(context + room) // bs)
        vocab = runner.model.config.vocab_size
        self.context = context
        self.seqs = []
        for i in range(batch):
            prompt = torch.randint(0, vocab, (context,), generator=gen).tolist()
            seq = Sequence(prompt, SamplingParams(max_tokens=room, temperature=0.0))
            seq.block_table = list(range(i * per_seq, (i + 1) * per_seq))
            self.seqs.append(seq)

    def prefill(self, runner, budget: int) -> None:
        pending = list(self.seqs)
        while pending:
            chunk_seqs, chunks, left = [], [], budget
            for seq in pending:
                if left == 0:
                    break
                take = min(seq.num_uncached, left)
                chunk_seqs.append(seq)
                chunks.append(take)
                left -= take
            tokens, _ = runner.run(chunk_seqs, [-1] * len(chunk_seqs), chunks)
            done = [s for s in chunk_seqs if s.num_uncached == 0]
            for seq, token in zip(done, tokens, strict=True):
                seq.output_ids.append(token)
            pending = [s for s in pending if not s.output_ids]

    def rewind(self) -> None:
        """Back to one sampled token after the context: every row decodes the same steps."""
        for seq in self.seqs:
            del seq.output_ids[1:]
            seq.num_cached = self.context

    def step(self, runner, slots: list[int]) -> list[int]:
        tokens, _ = runner.run(self.seqs, slots)
        for seq, token in zip(self.seqs, tokens, strict=True):
            seq.output_ids.append(token)
        return tokens


def time_steps(runner, batch: Batch, slots: list[int], steps: int, device) -> float:
    """Milliseconds per decode step (host and device: run() waits for the tokens)."""
    import torch

    batch.rewind()
    for _ in range(3):
        batch.step(runner, slots)
    batch.rewind()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        batch.step(runner, slots)
    return (time.perf_counter() - start) * 1e3 / steps


def make_runner(hf: dict, model, args, device, targets: tuple[str, ...], kv_tokens: int):
    from loraplane.runtime.config import RuntimeConfig
    from loraplane.runtime.model_runner import ModelRunner

    config = RuntimeConfig(
        model="random",
        device=device.type,
        dtype="bfloat16" if device.type == "cuda" else "float32",
        max_adapters=max(64, args.batch),
        max_lora_rank=args.rank,
        max_running=args.batch,
        max_num_batched_tokens=max(args.batch, 4096 if device.type == "cuda" else 64),
        kv_cache_tokens=kv_tokens,
        lora_target_modules=targets,
        attention_backend="triton",
        allow_unauthenticated_admin=True,
    )
    return ModelRunner(config, None, model=model)


def main() -> None:
    args = parse_args()
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    tiny = args.tiny or args.cpu
    args.batch = args.batch or (4 if tiny else 64)
    args.context = args.context or (24 if tiny else 512)
    args.steps = args.steps or (3 if tiny else 48)
    device = torch.device("cpu" if args.cpu else "cuda")
    hf = PRESETS["tiny" if tiny else "llama3-8b"]
    dtype = torch.float32 if args.cpu else torch.bfloat16
    room = args.steps + 8
    bs = 16
    kv_tokens = args.batch * (-(-(args.context + room) // bs)) * bs
    print(f"# engine_step {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"# device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    print(
        f"# model {'tiny' if tiny else 'llama3-8b'} {dtype}, batch {args.batch}, context "
        f"{args.context}, rank {args.rank}, {args.steps} timed steps per row"
    )
    t0 = time.perf_counter()
    model = build_model(hf, dtype, device)
    print(f"# built the model in {time.perf_counter() - t0:.1f} s")

    rows: dict[str, float] = {}
    # Plain first: LoRA injection wraps the model's Linears in place.
    t0 = time.perf_counter()
    plain = make_runner(hf, model, args, device, (), kv_tokens)
    batch = Batch(plain, args.batch, args.context, room, seed=1)
    batch.prefill(plain, plain.config.max_num_batched_tokens)
    rows["plain"] = time_steps(plain, batch, [-1] * args.batch, args.steps, device)
    print(f"# plain runner built, prefilled and timed in {time.perf_counter() - t0:.1f} s")
    del plain
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    t0 = time.perf_counter()
    runner = make_runner(hf, model, args, device, TARGETS, kv_tokens)
    print(
        f"# LoRA runner: {runner.kv_blocks} KV blocks, "
        f"{len(runner.graphs.graphs) if runner.graphs else 0} graphs, "
        f"built in {time.perf_counter() - t0:.1f} s"
    )
    for slot in range(args.batch):
        runner.load_adapter(slot, random_adapter(runner, args.rank, seed=100 + slot))
    batch = Batch(runner, args.batch, args.context, room, seed=1)
    batch.prefill(runner, runner.config.max_num_batched_tokens)

    distinct = list(range(args.batch))
    # The check: graph and eager steps choose the same tokens from the same state.
    graphs = runner.graphs
    if graphs is None:
        print("check graph vs eager tokens: skipped (no CUDA graphs on a CPU)")
    else:
        batch.rewind()
        with_graph = batch.step(runner, distinct)
        runner.graphs = None
        batch.rewind()
        eager = batch.step(runner, distinct)
        runner.graphs = graphs
        same = sum(a == b for a, b in zip(with_graph, eager, strict=True))
        print(f"check graph vs eager tokens: {same}/{args.batch} equal")

    configs = {
        "no adapter": [-1] * args.batch,
        "1 adapter": [0] * args.batch,
        "8 adapters": [i % 8 for i in range(args.batch)],
        f"{args.batch} adapters": distinct,
    }
    for name, slots in configs.items():
        rows[name] = time_steps(runner, batch, slots, args.steps, device)
    if graphs is not None:
        runner.graphs = None
        for name in ("no adapter", f"{args.batch} adapters"):
            rows[f"{name} (eager)"] = time_steps(runner, batch, configs[name], args.steps, device)
        runner.graphs = graphs

    base = rows["no adapter"]
    print(f"{'configuration':<26}{'ms/step':>9}{'tokens/s':>10}{'vs no adapter':>15}")
    for name, ms in rows.items():
        print(f"{name:<26}{ms:>9.2f}{args.batch / ms * 1e3:>10.0f}{base / ms:>15.3f}")
    targets = [
        ("no adapter >= 0.98 of plain", rows["plain"] / base, 0.98),
        ("1 adapter >= 0.93 of no adapter", base / rows["1 adapter"], 0.93),
        (
            f"{args.batch} adapters >= 0.75 of no adapter",
            base / rows[f"{args.batch} adapters"],
            0.75,
        ),
    ]
    for what, ratio, goal in targets:
        verdict = "PASS" if ratio >= goal else "FAIL"
        note = "" if device.type == "cuda" else " (CPU: proves the script, not the target)"
        print(f"target {what}: {ratio:.3f} {verdict}{note}")


if __name__ == "__main__":
    main()
