"""Decode-step throughput of a random-weight Llama-3-8B-shaped model with N distinct LoRA adapters.

Reports each configuration as a ratio of the same engine with LoRA off, beside the ideal
ratio 1/(1 + N·r·Σ(d_in+d_out)/Σ(d_in·d_out)) over the model's LoRA sites, and times PEFT's
own mixed-batch path (adapter_names=) in the same run.

    python bench/decode.py                 # GPU, bf16, B=64, N=1/8/32/64 rank-16 adapters
    python bench/decode.py --cpu --tiny    # proves the script on a CPU (Triton interpreter)

Rows: "lora off" (our layers, no batch set), "plain model" (no LoRA layer injected at all),
"no adapter" (a batch where no sequence has one), N=k (sequence i uses adapter i mod k).

The engine is a plain decode loop over the HF model's own modules (norms, projections, MLP)
with a static KV cache, captured whole in one CUDA graph; our LoRA layers are injected into
the HF model. Nothing is downloaded: the model is built from a config with random weights.
"""

from __future__ import annotations

import argparse
import datetime

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRESETS = {
    "llama3-8b": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    },
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--tiny", action="store_true", help="tiny model and batch (seconds on a CPU)")
    p.add_argument("--batch", type=int, help="sequences per decode step (default 64; tiny 4)")
    p.add_argument("--context", type=int, help="tokens already in each KV cache (default 128)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--ns", help="distinct adapter counts, comma-separated (default 1,8,32,64)")
    p.add_argument("--peft-n", type=int, help="distinct adapters for the PEFT run (default 32)")
    p.add_argument("--no-peft", action="store_true", help="skip timing PEFT")
    p.add_argument("--iters", type=int, help="timed steps per configuration (median)")
    args = p.parse_args()
    tiny = args.tiny
    args.batch = args.batch or (4 if tiny else 64)
    args.context = args.context or (8 if tiny else 128)
    args.ns = [int(n) for n in (args.ns or ("1,2,4" if tiny else "1,8,32,64")).split(",")]
    args.peft_n = args.peft_n or (2 if tiny else 32)
    args.iters = args.iters or (2 if args.cpu else 20)
    return args


def main() -> int:
    args = parse_args()
    from device import choose_device

    device, dtype, gpu = choose_device(args.cpu)
    import torch

    preset = "tiny" if args.tiny else "llama3-8b"
    print(f"# bench/decode.py  {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"# device: {gpu}  torch {torch.__version__}  model {preset} {dtype}")
    print(f"# batch {args.batch}  context {args.context}  rank {args.rank}  N {args.ns}")
    if args.cpu:
        print("# CPU + Triton interpreter: proves the script runs; the times mean nothing")
    from decode_engine import Bench

    bench = Bench(args, PRESETS[preset], TARGETS, device, dtype)
    print(
        f"# attention: SDPA backend {bench.attention_backend()} in the timed step "
        f"(no mask, GQA {bench.cfg.num_attention_heads}/{bench.cfg.num_key_value_heads}, "
        f"{args.context + 1} keys)"
    )
    ok = bench.check()
    results = bench.time_all()
    if not args.no_peft:
        results.update(bench.time_peft())
    bench.report(results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
