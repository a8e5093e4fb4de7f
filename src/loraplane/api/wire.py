"""The wire contract between the operator and the runtime: names, states, keys and bodies.

Both sides import this module and nothing else of each other, so a rule changed here changes
on both sides at once. The runtime uses the models as its admin API's request and response
models; the operator parses the same models out of each pod's answers.
"""

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .basemodeldeployment import Dtype
from .loraadapter import SERVED_NAME, SERVED_NAME_MAX, AdapterState
from .source import ADAPTER_SCHEMES, MODEL_SCHEMES

# ---- adapter names ------------------------------------------------------------------------
# One grammar for LoraAdapter.spec.servedName, the runtime's adapter names (its admin API's
# path segment) and the ids in /v1/models. Users name adapters after their hub names
# ("customer_support", "Magicoder_v2"), so upper case, '_' and '.' are allowed; '/' is not,
# since the name is a URL path segment.
ADAPTER_NAME = SERVED_NAME
_ADAPTER_NAME = re.compile(ADAPTER_NAME)


def is_adapter_name(name: str) -> bool:
    return len(name) <= SERVED_NAME_MAX and _ADAPTER_NAME.match(name) is not None


def adapter_name_problem(name: str) -> str | None:
    """Why name is not a valid adapter name, in words a person can act on; None when valid."""
    if is_adapter_name(name):
        return None
    return (
        f"adapter name {name!r} is not valid: use 1 to {SERVED_NAME_MAX} letters, digits, "
        "'-', '_' and '.', starting and ending with a letter or digit"
    )


# ---- sources and credentials --------------------------------------------------------------
# The runtime accepts the API's schemes; plain http:// only for mirrors inside the cluster,
# and never with credentials (they would travel in clear).
RUNTIME_MODEL_SCHEMES = MODEL_SCHEMES
RUNTIME_ADAPTER_SCHEMES = (*ADAPTER_SCHEMES, "http")

# The keys of a LoraAdapter's secretRef the operator forwards as `credentials`, by scheme.
CREDENTIAL_KEYS_BY_SCHEME: dict[str, tuple[str, ...]] = {
    "hf": ("HF_TOKEN",),
    "s3": (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_ENDPOINT_URL",
    ),
    "https": ("BEARER_TOKEN",),
}
CREDENTIAL_KEYS: tuple[str, ...] = tuple(
    key for keys in CREDENTIAL_KEYS_BY_SCHEME.values() for key in keys
)


def redact_source(source: str) -> str:
    """source fit to show and log: a password in the URL and a (presigned) query become ***.

    A user-supplied URL may carry credentials (https://user:pass@host/..., an S3 presigned
    query); the runtime reports and logs only this form. Compare sources by this form too.
    """
    scheme, sep, rest = source.partition("://")
    if not sep:
        return source
    end = min((i for i in (rest.find(c) for c in "/?#") if i != -1), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if at and scheme in ("http", "https"):  # hf://name@revision is no userinfo
        authority = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else f"***@{host}"
    path, q, query = tail.partition("?")
    fragment = query.partition("#")[1:] if q else ("", "")
    return f"{scheme}://{authority}{path}" + ("?***" if q else "") + "".join(fragment)


def credential_keys_for(source: str) -> tuple[str, ...]:
    """The secret keys that matter for this source; other keys in the Secret stay unread."""
    scheme = source.split("://", 1)[0]
    return CREDENTIAL_KEYS_BY_SCHEME.get(scheme, ())


# ---- dtypes --------------------------------------------------------------------------------
RUNTIME_DTYPE: dict[Dtype, str] = {
    Dtype.BFLOAT16: "bfloat16",
    Dtype.FLOAT16: "float16",
    Dtype.FLOAT32: "float32",
}
"""spec.model.dtype -> the runtime's --dtype."""
RUNTIME_DTYPES: tuple[str, ...] = tuple(RUNTIME_DTYPE.values())


# ---- how the operator reaches a pod --------------------------------------------------------
ADMIN_TOKEN_ENV = "LORAPLANE_ADMIN_TOKEN"
"""Environment variable holding the bearer token of the runtime's admin API."""
ADMIN_TOKEN_KEY = "token"
"""Key of the admin token in the Secret the operator creates per deployment."""
ADAPTERS_PATH = "/v1/adapters"
READY_PATH = "/readyz"
HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
READINESS_GATE = "loraplane.io/adapters-loaded"
"""Pod readiness gate: True once the operator saw the pod hold every adapter it should."""

# Runtime metric names the operator and the router read (prometheus-client adds _total to a
# counter's samples).
METRIC_REQUESTS = "loraplane_requests"
METRIC_REQUESTS_TOTAL = "loraplane_requests_total"
METRIC_IN_FLIGHT = "loraplane_requests_in_flight"
METRIC_QUEUE_DEPTH = "loraplane_queue_depth"


# ---- adapter states -------------------------------------------------------------------------
class RuntimeAdapterState(StrEnum):
    """An adapter's state as one runtime reports it."""

    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


REPLICA_STATE: dict[RuntimeAdapterState, AdapterState] = {
    RuntimeAdapterState.LOADING: AdapterState.LOADING,
    RuntimeAdapterState.LOADED: AdapterState.LOADED,
    RuntimeAdapterState.UNLOADING: AdapterState.UNLOADING,
    RuntimeAdapterState.FAILED: AdapterState.FAILED,
}
"""A runtime's state -> LoraAdapter.status.replicas[].state. Pending means not on the pod yet."""


class Tier(StrEnum):
    """Where a loaded adapter's weights are: a GPU slot, host memory, or only on local disk."""

    GPU = "gpu"
    CPU = "cpu"
    DISK = "disk"


class AdapterErrorCode(StrEnum):
    """`error.code` of an admin API refusal: what the operator turns into a condition."""

    INVALID_NAME = "invalid_name"
    NOT_FOUND = "not_found"
    SOURCE_NOT_FOUND = "source_not_found"
    SOURCE_UNREACHABLE = "source_unreachable"
    INVALID_SOURCE = "invalid_source"
    INVALID_ADAPTER = "invalid_adapter"
    INCOMPATIBLE = "incompatible"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    CONFLICT = "conflict"
    SOURCE_TOO_LARGE = "source_too_large"
    SOURCE_TIMEOUT = "source_timeout"
    TOO_MANY_FETCHES = "too_many_fetches"
    INSUFFICIENT_STORAGE = "insufficient_storage"
    SHUTTING_DOWN = "shutting_down"


# Refusals that another try cannot fix: only a change of the adapter or the base can.
PERMANENT_ERRORS = frozenset(
    {AdapterErrorCode.INCOMPATIBLE, AdapterErrorCode.INVALID_ADAPTER, AdapterErrorCode.INVALID_NAME}
)


# ---- admin API bodies -----------------------------------------------------------------------
class _Wire(BaseModel):
    # Unknown fields are ignored when reading, so an older operator can read a newer runtime.
    model_config = ConfigDict(extra="ignore")


class AdapterLoadRequest(BaseModel):
    """Body of PUT /v1/adapters/{name}: an idempotent load (same source and digest is a no-op)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, max_length=2048)
    revision: str | None = Field(default=None, max_length=256)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    pinned: bool = False
    # A LoraAdapter secretRef's data (CREDENTIAL_KEYS); used once, never echoed or logged.
    credentials: dict[str, str] | None = Field(default=None, repr=False)


class AdapterInfo(_Wire):
    """One adapter on one runtime: what the operator trusts as residency."""

    name: str
    source: str
    revision: str | None = None
    sha256: str | None = None
    pinned: bool = False
    state: RuntimeAdapterState
    tier: Tier | None = None
    rank: int | None = None
    target_modules: list[str] | None = None
    size_bytes: int | None = None
    loaded_at: datetime | None = None
    loading_since: datetime | None = None
    error: str | None = None


class AdapterList(_Wire):
    """Body of GET /v1/adapters."""

    adapters: list[AdapterInfo]


class AdapterUnloaded(_Wire):
    """Body of DELETE /v1/adapters/{name}: unloading while requests still use it."""

    name: str
    state: Literal["unloading", "unloaded"]


class ErrorDetail(_Wire):
    message: str
    type: str | None = None
    param: str | None = None
    code: Annotated[str, Field(max_length=64)] | None = None


class ErrorBody(_Wire):
    """The body of any admin API refusal (OpenAI's error shape)."""

    error: ErrorDetail


# ---- the router ---------------------------------------------------------------------------
# The operator deploys one router per BaseModelDeployment (docs/router.md) and renders its
# environment from these names; the router reads them in loraplane.router.config.
ROUTER_NAMESPACE_ENV = "LORAPLANE_ROUTER_NAMESPACE"
ROUTER_BASE_ENV = "LORAPLANE_ROUTER_BASE"
"""The BaseModelDeployment the router serves, in its namespace."""
ROUTER_POD_SELECTOR_ENV = "LORAPLANE_ROUTER_POD_SELECTOR"
"""Label selector of the base's runtime pods (the operator's, as status.selector shows it)."""
ROUTER_HOST_ENV = "LORAPLANE_ROUTER_HOST"
ROUTER_PORT_ENV = "LORAPLANE_ROUTER_PORT"
ROUTER_METRICS_PORT_ENV = "LORAPLANE_ROUTER_METRICS_PORT"
ROUTER_API_KEYS_SECRET_ENV = "LORAPLANE_ROUTER_API_KEYS_SECRET"

ROUTER_METRICS_PORT = 9090
"""The router's /metrics port: apart from the Service's port, so clients never see it."""
API_KEYS_SUFFIX = "-api-keys"


def api_keys_secret(base: str) -> str:
    """The Secret whose values are the API keys clients of this base must send; while it
    does not exist the router is open to every client that reaches it."""
    return f"{base}{API_KEYS_SUFFIX}"


# Router metric names (prometheus-client adds _total to a counter's samples). The label
# `adapter` is the served name, or the base's name for requests to the base model.
ROUTER_METRIC_HELD = "loraplane_router_held_requests"
"""Gauge: requests the router holds because no ready pod can take them (a base at zero, or
all its pods starting). The autoscaler's `held`: sum it over the base's router pods, and a
base at zero with held > 0 must get a replica."""
ROUTER_METRIC_REQUESTS = "loraplane_router_requests"
ROUTER_METRIC_REQUESTS_TOTAL = "loraplane_router_requests_total"
"""Counter: requests answered, by adapter and HTTP code (holds that timed out included)."""
ROUTER_METRIC_IN_FLIGHT = "loraplane_router_requests_in_flight"
"""Gauge: requests sent to pods and not finished."""
ROUTER_METRIC_DURATION = "loraplane_router_request_duration_seconds"
ROUTER_METRIC_UPSTREAM_ERRORS = "loraplane_router_upstream_errors"
ROUTER_METRIC_ROUTED = "loraplane_router_routed"
"""Counter: requests sent to a pod, by adapter and residency (hit: the pod holds the adapter
by the operator's verified residency; fallback: no ready pod did)."""
