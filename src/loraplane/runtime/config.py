"""RuntimeConfig: every knob of one runtime process, built from the command line and passed down."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from loraplane.api.wire import ADMIN_TOKEN_ENV, RUNTIME_DTYPES
from loraplane.runtime.adapters.guard import DEFAULT_DENY

DEVICES = ("cpu", "cuda")
ATTENTION_BACKENDS = ("auto", "triton", "torch")
# Every projection of a Llama/Mistral/Qwen2 block; the tiny test models and adapters use it too.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The default of --cache-dir: this one process's adapter downloads. Not the operator's
# LORAPLANE_CACHE_ROOT (the directory under which it gives each runtime pod a --cache-dir) nor
# the developer cache LORAPLANE_CACHE (Go tools and demo models, loraplane.testing.cache).
CACHE_DIR_ENV = "LORAPLANE_CACHE_DIR"


@dataclass
class RuntimeConfig:
    model: str  # a local directory or a source URI (file://, pvc://, hf://, s3://)
    served_model_name: str | None = None
    # Other names the base goes by (e.g. its hub id when served from a PVC copy), so adapters
    # whose adapter_config.json names it pass the base-model check.
    base_model_aliases: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    dtype: str = "float32"
    max_adapters: int = 8  # GPU slots
    max_cpu_adapters: int = 32  # host-memory copies beyond the slots
    max_lora_rank: int = 64
    max_num_batched_tokens: int = 8192  # tokens per forward: the step's budget
    # Tokens per sequence (prompt + max_tokens); None: the model's limit, within the cache.
    max_model_len: int | None = None
    # The KV cache's capacity. None: sized from free device memory on a GPU (after a profiling
    # forward, to gpu_memory_utilization of the card); on a CPU, max_num_batched_tokens.
    kv_cache_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    prefix_caching: bool = True
    kv_watermark: float = 0.01  # share of KV blocks admission leaves free for running decodes
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    # Schedule and launch step N+1 before reading step N's tokens, so the GPU never waits for
    # the host between steps. On for every device: a CPU's launch is synchronous, so it gains
    # nothing there, but the CPU then takes the GPU's step order and its tests cover it.
    async_scheduling: bool = True
    # "triton": paged kernels over block tables; "torch": gather + SDPA; "auto": triton on a GPU.
    attention_backend: str = "auto"
    max_queue: int = 256  # waiting requests before 429
    max_running: int = 64  # sequences decoded together
    block_size: int = 16
    adapters: dict[str, str] = field(default_factory=dict)  # preloaded: name -> source
    admin_token: str | None = None
    # Without a token the admin API (load any URL, unload anyone's adapter) is open to every
    # client that reaches the port: only with this said out loud.
    allow_unauthenticated_admin: bool = False
    cache_dir: Path = Path.home() / ".cache" / "loraplane" / "runtime"
    pvc_root: Path = Path("/mnt/pvc")  # pvc://claim/path -> pvc_root/claim/path
    hf_token: str | None = None
    lora_target_modules: tuple[str, ...] = DEFAULT_TARGETS
    default_max_tokens: int = 256  # chat requests that give no max_tokens
    shutdown_timeout_s: float = 30.0
    # The engine in its own process, the HTTP server (tokenizing, text, streaming) in this
    # one: they no longer take turns on one GIL. False: one process (debugging, most tests).
    engine_process: bool = True
    seed: int = 0
    # Hostile input bounds (docs/security.md).
    max_request_bytes: int = 4 << 20  # an HTTP body; a prompt of max_model_len is far less
    max_adapter_bytes: int = 4 << 30  # an adapter's download, and what its archive unpacks to
    fetch_timeout_s: float = 600.0  # one adapter fetch, end to end
    max_concurrent_fetches: int = 4  # remote adapter fetches at once; more get 429
    deny_source_cidrs: tuple[str, ...] = DEFAULT_DENY  # never fetched from
    allow_source_cidrs: tuple[str, ...] = ()  # carve-outs from deny_source_cidrs

    def __post_init__(self) -> None:
        if self.dtype not in RUNTIME_DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {RUNTIME_DTYPES}")
        if self.device not in DEVICES:
            raise ValueError(f"--device {self.device!r} is not one of {DEVICES}")
        if self.max_adapters < 1:
            raise ValueError(f"--max-adapters must be at least 1, got {self.max_adapters}")
        if self.max_cpu_adapters < 0:
            raise ValueError(f"--max-cpu-adapters must be >= 0, got {self.max_cpu_adapters}")
        # Every request waits in the queue until the next step: 0 would refuse them all.
        for name in ("max_queue", "max_running"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if not 1 <= self.max_lora_rank <= 1024:
            raise ValueError(f"--max-lora-rank must be in 1..1024, got {self.max_lora_rank}")
        if self.max_num_batched_tokens < self.max_running:
            raise ValueError(
                f"--max-num-batched-tokens {self.max_num_batched_tokens} is below --max-running "
                f"{self.max_running}: every running sequence decodes a token each step"
            )
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError(
                f"--kv-cache-tokens {self.kv_cache_tokens} is below the block size {self.block_size}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"--max-model-len must be at least 2, got {self.max_model_len}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"--attention-backend {self.attention_backend!r} is not one of {ATTENTION_BACKENDS}"
            )
        if not 0.0 <= self.kv_watermark < 0.5:
            raise ValueError(f"--kv-watermark must be in [0, 0.5), got {self.kv_watermark}")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port {self.port} is out of range")
        if self.admin_token is not None and not self.admin_token.strip():
            raise ValueError("the admin token is empty; put a token in --admin-token-file")
        if self.admin_token is None and not self.allow_unauthenticated_admin:
            raise ValueError(
                "the admin API needs a bearer token: give --admin-token-file or "
                f"{ADMIN_TOKEN_ENV}, or --allow-unauthenticated-admin to leave it open "
                "(local tests and demos only)"
            )
        for name in ("max_request_bytes", "max_adapter_bytes", "max_concurrent_fetches"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if not self.fetch_timeout_s > 0:
            raise ValueError(f"--fetch-timeout must be positive, got {self.fetch_timeout_s}")
        for flag, cidrs in (
            ("--deny-source-cidr", self.deny_source_cidrs),
            ("--allow-source-cidr", self.allow_source_cidrs),
        ):
            for cidr in cidrs:
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError as e:
                    raise ValueError(f"{flag} {cidr!r} is not a CIDR: {e}") from e
        self.cache_dir = Path(self.cache_dir)
        self.pvc_root = Path(self.pvc_root)

    @property
    def paged_attention(self) -> bool:
        if self.attention_backend == "auto":
            return self.device == "cuda"
        return self.attention_backend == "triton"

    def host_kv_cache_tokens(self) -> int:
        """The KV capacity when not sized from device memory."""
        if self.kv_cache_tokens is not None:
            return self.kv_cache_tokens
        return max(self.max_num_batched_tokens, self.max_model_len or 0)
