"""loraplane-runtime: serve one base model and many LoRA adapters over HTTP."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from loraplane.api.wire import ADMIN_TOKEN_ENV, RUNTIME_DTYPES
from loraplane.runtime.config import ATTENTION_BACKENDS, CACHE_DIR_ENV, RuntimeConfig

if TYPE_CHECKING:
    from loraplane.runtime.runtime import Runtime


def parse_args(
    argv: list[str] | None = None, environ: dict[str, str] | None = None
) -> RuntimeConfig:
    env = os.environ if environ is None else environ
    p = _parser(env)
    a = p.parse_args(argv)
    d = _defaults()
    # Asked only when not given: the question imports torch and wakes the CUDA driver.
    device = a.device or ("cuda" if _has_cuda() else "cpu")
    adapters = {}
    for item in a.adapter:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            p.error(f"--adapter {item!r} must be NAME=SOURCE")
        adapters[name] = source
    token = env.get(ADMIN_TOKEN_ENV) or None
    if a.admin_token_file is not None:
        token = a.admin_token_file.read_text().strip()
        if not token:
            raise ValueError(f"--admin-token-file {a.admin_token_file} is empty")
    logging.basicConfig(
        level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return RuntimeConfig(
        model=a.model,
        served_model_name=a.served_model_name,
        base_model_aliases=tuple(a.base_model_alias),
        host=a.host,
        port=a.port,
        device=device,
        dtype=a.dtype or ("bfloat16" if device == "cuda" else "float32"),
        max_adapters=a.max_adapters,
        max_cpu_adapters=a.max_cpu_adapters,
        max_lora_rank=a.max_lora_rank,
        max_num_batched_tokens=a.max_num_batched_tokens,
        max_model_len=a.max_model_len,
        kv_cache_tokens=a.kv_cache_tokens,
        gpu_memory_utilization=a.gpu_memory_utilization,
        prefix_caching=a.prefix_caching,
        kv_watermark=a.kv_watermark,
        enforce_eager=a.enforce_eager,
        async_scheduling=a.async_scheduling,
        attention_backend=a.attention_backend,
        max_queue=a.max_queue,
        max_running=a.max_running,
        adapters=adapters,
        admin_token=token,
        allow_unauthenticated_admin=a.allow_unauthenticated_admin,
        cache_dir=a.cache_dir,
        pvc_root=a.pvc_root,
        hf_token=env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN"),
        shutdown_timeout_s=a.shutdown_timeout,
        engine_process=a.engine_process,
        max_request_bytes=a.max_request_bytes,
        max_adapter_bytes=a.max_adapter_bytes,
        fetch_timeout_s=a.fetch_timeout,
        max_concurrent_fetches=a.max_concurrent_fetches,
        deny_source_cidrs=tuple(a.deny_source_cidr) if a.deny_source_cidr else d.deny_source_cidrs,
        allow_source_cidrs=tuple(a.allow_source_cidr),
    )


def _defaults() -> RuntimeConfig:
    return RuntimeConfig(model="unset", allow_unauthenticated_admin=True)


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    d = _defaults()
    p = argparse.ArgumentParser(prog="loraplane-runtime", description=__doc__)
    p.add_argument("--model", required=True, help="local directory or source URI of the base")
    p.add_argument("--served-model-name", help="the model id clients send for the base")
    p.add_argument(
        "--base-model-alias",
        action="append",
        default=[],
        metavar="NAME",
        help="another name of the base (e.g. its hub id) for adapter checks",
    )
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when torch sees one")
    p.add_argument(
        "--dtype",
        default=None,
        choices=RUNTIME_DTYPES,
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    p.add_argument("--max-adapters", type=int, default=d.max_adapters, help="GPU slots")
    p.add_argument(
        "--max-cpu-adapters",
        type=int,
        default=d.max_cpu_adapters,
        help="host-memory copies beyond the GPU slots",
    )
    p.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank)
    p.add_argument(
        "--max-num-batched-tokens",
        "--max-batch-tokens",  # its name before the KV cache was sized apart from it
        dest="max_num_batched_tokens",
        type=int,
        default=d.max_num_batched_tokens,
        help="tokens per forward pass: decodes first, then prompts in chunks of what is left",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        help="tokens per sequence, prompt + max_tokens (default: the model's, within the cache)",
    )
    p.add_argument(
        "--kv-cache-tokens",
        type=int,
        help="KV cache capacity in tokens (default: sized from free GPU memory; on a CPU, "
        "--max-num-batched-tokens)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=d.gpu_memory_utilization,
        help="share of the GPU's memory for weights, activations and the KV cache",
    )
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="never share the KV blocks of identical prompt prefixes (same adapter only)",
    )
    p.add_argument(
        "--kv-watermark",
        type=float,
        default=d.kv_watermark,
        help="share of KV blocks kept free at admission, so running requests are not preempted",
    )
    p.add_argument(
        "--enforce-eager", action="store_true", help="run decode steps without CUDA graphs"
    )
    p.add_argument(
        "--no-async-scheduling",
        dest="async_scheduling",
        action="store_false",
        help="read each step's tokens before scheduling the next (the GPU waits for the host)",
    )
    p.add_argument(
        "--attention-backend",
        choices=ATTENTION_BACKENDS,
        default=d.attention_backend,
        help="triton: paged kernels over the block tables; torch: gather + SDPA (CPU); "
        "auto: triton on a GPU",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help="waiting requests before the server answers 429",
    )
    p.add_argument("--max-running", type=int, default=d.max_running)
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="preload an adapter (repeatable)",
    )
    p.add_argument(
        "--admin-token-file",
        type=Path,
        help=f"bearer token for /v1/adapters (or env {ADMIN_TOKEN_ENV})",
    )
    p.add_argument(
        "--allow-unauthenticated-admin",
        action="store_true",
        help="serve the admin API without a token (local tests and demos only)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=d.max_request_bytes,
        help="largest HTTP request body; larger ones get 413",
    )
    p.add_argument(
        "--max-adapter-bytes",
        type=int,
        default=d.max_adapter_bytes,
        help="largest adapter download, and the most its archive may unpack to",
    )
    p.add_argument(
        "--fetch-timeout",
        type=float,
        default=d.fetch_timeout_s,
        help="seconds one adapter fetch may take, end to end",
    )
    p.add_argument(
        "--max-concurrent-fetches",
        type=int,
        default=d.max_concurrent_fetches,
        help="remote adapter fetches at once; more PUTs get 429",
    )
    p.add_argument(
        "--deny-source-cidr",
        action="append",
        default=[],
        metavar="CIDR",
        help=f"never fetch adapters from here (repeatable; replaces the default {', '.join(d.deny_source_cidrs)})",
    )
    p.add_argument(
        "--allow-source-cidr",
        action="append",
        default=[],
        metavar="CIDR",
        help="fetch from here even inside a denied range (repeatable)",
    )
    p.add_argument("--cache-dir", type=Path, default=Path(env.get(CACHE_DIR_ENV, d.cache_dir)))
    p.add_argument(
        "--pvc-root",
        type=Path,
        default=d.pvc_root,
        help="where pvc://claim/path is mounted: PVC_ROOT/claim/path",
    )
    p.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout_s)
    p.add_argument(
        "--no-engine-process",
        dest="engine_process",
        action="store_false",
        help="run the engine in the HTTP server's process (by default it has its own, so "
        "tokenizing, text and streaming never hold up a step)",
    )
    p.add_argument("--log-level", default="info")
    return p


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def serve(config: RuntimeConfig) -> int:
    """Serve until SIGTERM (0), or until the engine's process dies (1)."""
    import uvicorn

    from loraplane.runtime.server import create_app

    server: uvicorn.Server | None = None
    engine_died = False

    def on_engine_gone() -> None:
        nonlocal engine_died
        engine_died = True
        if server is not None:
            server.should_exit = True  # a port that can serve nothing must not stay open

    if config.engine_process:
        from loraplane.runtime.engine_client import RemoteRuntime

        runtime: RemoteRuntime | Runtime = RemoteRuntime(
            config, logging.getLogger().level, on_gone=on_engine_gone
        )
    else:
        from loraplane.runtime.runtime import Runtime

        runtime = Runtime(config)
    app = create_app(runtime)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Readiness fails at once, so load balancers stop sending before we close.
            runtime.begin_shutdown(config.shutdown_timeout_s)
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level="warning",
            timeout_graceful_shutdown=int(config.shutdown_timeout_s),
        )
    )
    # uvicorn re-raises SIGTERM once it has drained; with this handler in place that re-raise
    # lands here and the process exits 0, telling Kubernetes the shutdown was clean.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    return 1 if engine_died else 0


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(argv)
    except (ValueError, OSError) as e:
        print(f"loraplane-runtime: {e}", file=sys.stderr)
        return 2
    from loraplane.runtime.adapters.errors import AdapterError
    from loraplane.runtime.engine_client import EngineStartFailed

    try:
        return serve(config)
    except EngineStartFailed as e:  # the engine's process said why, and logged any traceback
        where = "--model " + config.model if e.kind == "model" else "the engine"
        print(f"loraplane-runtime: {where}: {e.message}", file=sys.stderr)
        return 2 if e.kind == "model" else 1
    except AdapterError as e:  # --model from a source that failed: say why, no traceback
        print(f"loraplane-runtime: --model {config.model}: {e.message}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # not a model we can serve
        print(f"loraplane-runtime: --model {config.model}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
