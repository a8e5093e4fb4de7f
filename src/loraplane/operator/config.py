"""OperatorConfig: every knob of the operator, read from the environment in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

DEFAULT_RUNTIME_IMAGE = "ghcr.io/loraplane/runtime:0.1.0"

# Environment variable -> OperatorConfig field. The chart sets these; `--help` lists them.
ENV = {
    "LORAPLANE_NAMESPACES": "namespaces",
    "LORAPLANE_RUNTIME_IMAGE": "runtime_image",
    "LORAPLANE_RUNTIME_COMMAND": "runtime_command",
    "LORAPLANE_PEERING": "peering",
    "LORAPLANE_PRIORITY": "priority",
    "LORAPLANE_BIND_ADDRESS": "bind_address",
    "LORAPLANE_METRICS_PORT": "metrics_port",
    "LORAPLANE_HEALTH_PORT": "health_port",
    "LORAPLANE_SYNC_CONCURRENCY": "sync_concurrency",
    "LORAPLANE_RESYNC_SECONDS": "resync_seconds",
    "LORAPLANE_AUTOSCALE_SECONDS": "autoscale_seconds",
    "LORAPLANE_RUNTIME_TIMEOUT_SECONDS": "runtime_timeout_seconds",
    "LORAPLANE_LOAD_TIMEOUT_SECONDS": "load_timeout_seconds",
    "LORAPLANE_RUNTIME_SHUTDOWN_SECONDS": "runtime_shutdown_seconds",
    "LORAPLANE_CACHE_ROOT": "cache_root",
}


@dataclass(frozen=True)
class OperatorConfig:
    namespaces: tuple[str, ...] = ()
    """Namespaces to watch; empty watches the whole cluster."""
    runtime_image: str = DEFAULT_RUNTIME_IMAGE
    """Image of runtime pods whose BaseModelDeployment sets none."""
    runtime_command: tuple[str, ...] = ("loraplane-runtime",)
    """The runtime's entrypoint in that image."""
    peering: str | None = None
    """kopf peering name: replicas that share it elect one active operator. None: standalone."""
    priority: int = 0
    """This replica's peering priority; the highest active one leads."""
    bind_address: str = "0.0.0.0"
    """Address of the metrics and health servers (the pod IP where pods share a host)."""
    metrics_port: int = 8080
    health_port: int = 8081
    sync_concurrency: int = 16
    """Pod calls in flight at once, over all pods (each pod gets at most one at a time)."""
    resync_seconds: float = 30.0
    """How often every base's pods are re-measured to repair drift."""
    autoscale_seconds: float = 2.0
    """How often each fleet's pods are scraped and the autoscaler decides."""
    runtime_timeout_seconds: float = 5.0
    """Per call to a pod's admin API, for GET and DELETE."""
    load_timeout_seconds: float = 300.0
    """Per PUT: fetching an adapter from a remote source can take a while."""
    runtime_shutdown_seconds: int = 30
    """The runtime's drain on SIGTERM; pods get this plus a margin as their grace period."""
    cache_root: str = "/var/cache/loraplane"
    """Where runtime pods keep downloaded weights (each pod under its own name)."""

    def __post_init__(self) -> None:
        if self.sync_concurrency < 1:
            raise ValueError(
                f"LORAPLANE_SYNC_CONCURRENCY must be at least 1, got {self.sync_concurrency}"
            )
        if self.resync_seconds < 1:
            raise ValueError(
                f"LORAPLANE_RESYNC_SECONDS must be at least 1, got {self.resync_seconds}"
            )
        for name in ("runtime_timeout_seconds", "load_timeout_seconds", "autoscale_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{_env_name(name)} must be positive, got {getattr(self, name)}")
        for name in ("metrics_port", "health_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ValueError(f"{_env_name(name)} {getattr(self, name)} is not a port")
        if not self.runtime_command:
            raise ValueError("LORAPLANE_RUNTIME_COMMAND must name the runtime's entrypoint")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> OperatorConfig:
        """The config from environment variables; unset or empty ones keep their defaults."""
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, object] = {}
        for var, name in ENV.items():
            raw = environ.get(var, "").strip()
            if not raw:
                continue
            kind = str(types[name])
            try:
                if kind.startswith("tuple"):
                    sep = "," if name == "namespaces" else None
                    values[name] = tuple(p.strip() for p in raw.split(sep) if p.strip())
                elif kind == "int":
                    values[name] = int(raw)
                elif kind == "float":
                    values[name] = float(raw)
                else:
                    values[name] = raw
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a valid {kind}") from None
        return cls(**values)  # type: ignore[arg-type]


def _env_name(field_name: str) -> str:
    return next(var for var, name in ENV.items() if name == field_name)
