"""RouterConfig: every knob of one router process, read from the environment in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from loraplane.api.wire import (
    ROUTER_API_KEYS_SECRET_ENV,
    ROUTER_BASE_ENV,
    ROUTER_HOST_ENV,
    ROUTER_METRICS_PORT,
    ROUTER_METRICS_PORT_ENV,
    ROUTER_NAMESPACE_ENV,
    ROUTER_POD_SELECTOR_ENV,
    ROUTER_PORT_ENV,
)

# Environment variable -> RouterConfig field. The operator sets the first ones (their names are
# in loraplane.api.wire); the others keep their defaults unless a person sets them.
ENV = {
    ROUTER_NAMESPACE_ENV: "namespace",
    ROUTER_BASE_ENV: "base",
    ROUTER_POD_SELECTOR_ENV: "pod_selector",
    ROUTER_HOST_ENV: "host",
    ROUTER_PORT_ENV: "port",
    ROUTER_METRICS_PORT_ENV: "metrics_port",
    ROUTER_API_KEYS_SECRET_ENV: "api_keys_secret",
    "LORAPLANE_ROUTER_MAX_HELD": "max_held",
    "LORAPLANE_ROUTER_HOLD_TIMEOUT_SECONDS": "hold_timeout_seconds",
    "LORAPLANE_ROUTER_RETRY_AFTER_SECONDS": "retry_after_seconds",
    "LORAPLANE_ROUTER_MAX_BODY_BYTES": "max_body_bytes",
    "LORAPLANE_ROUTER_CONNECT_TIMEOUT_SECONDS": "connect_timeout_seconds",
    "LORAPLANE_ROUTER_READ_TIMEOUT_SECONDS": "read_timeout_seconds",
    "LORAPLANE_ROUTER_MAX_CONNECTIONS": "max_connections",
}


@dataclass(frozen=True)
class RouterConfig:
    namespace: str
    base: str
    """The BaseModelDeployment served: the router of exactly one base."""
    pod_selector: str
    """Label selector of the base's runtime pods, as the operator renders it."""
    host: str = "0.0.0.0"
    port: int = 8000
    metrics_port: int = ROUTER_METRICS_PORT
    api_keys_secret: str = ""
    """Secret whose values are the accepted API keys; empty: no keys, the router is open."""
    max_held: int = 1024
    """Requests held at once while no pod can take them; more get 429."""
    hold_timeout_seconds: float = 300.0
    """How long a held request waits for a pod (a GPU pod may take minutes to load its model);
    then 503. Clients' own timeouts (OpenAI's SDK: 600 s) should be longer."""
    retry_after_seconds: int = 10
    """Retry-After of a 429 or 503 from the router."""
    max_body_bytes: int = 4 << 20
    """Largest request body; the runtime's --max-request-bytes default."""
    connect_timeout_seconds: float = 3.0
    """A pod that does not accept the connection this fast is failed over."""
    read_timeout_seconds: float = 600.0
    """Longest silence from a pod while it generates (the whole answer, unless streaming)."""
    max_connections: int = 1024
    """Connections to pods at once, over all pods."""

    def __post_init__(self) -> None:
        for name in ("namespace", "base", "pod_selector"):
            if not getattr(self, name):
                raise ValueError(
                    f"{_env_name(name)} is required (the operator sets it); it is empty"
                )
        for name in ("port", "metrics_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ValueError(f"{_env_name(name)} {getattr(self, name)} is not a port")
        if self.port == self.metrics_port:
            raise ValueError(
                f"{_env_name('port')} and {_env_name('metrics_port')} are both {self.port}; "
                "the metrics port must differ so the Service never exposes it"
            )
        for name in ("max_held", "max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_env_name(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("hold_timeout_seconds", "connect_timeout_seconds", "read_timeout_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{_env_name(name)} must be positive, got {getattr(self, name)}")
        if self.retry_after_seconds < 0:
            raise ValueError(
                f"{_env_name('retry_after_seconds')} must be >= 0, got {self.retry_after_seconds}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RouterConfig:
        """The config from environment variables; unset or empty ones keep their defaults."""
        types = {f.name: str(f.type) for f in fields(cls)}
        values: dict[str, object] = {}
        for var, name in ENV.items():
            raw = environ.get(var, "").strip()
            if not raw:
                continue
            try:
                if types[name] == "int":
                    values[name] = int(raw)
                elif types[name] == "float":
                    values[name] = float(raw)
                else:
                    values[name] = raw
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a valid {types[name]}") from None
        for required in ("namespace", "base", "pod_selector"):
            values.setdefault(required, "")
        return cls(**values)  # type: ignore[arg-type]


def _env_name(field_name: str) -> str:
    return next(var for var, name in ENV.items() if name == field_name)
