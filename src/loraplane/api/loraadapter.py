"""LoraAdapter: one fine-tuned adapter, served by every replica of its BaseModelDeployment."""

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from .base import (
    DNS1123_LABEL,
    MAX_COUNTER,
    BaseModelName,
    DNSSubdomain,
    K8sModel,
    LocalObjectReference,
    ObjectMeta,
    Rule,
    Sha256,
)
from .conditions import ConditionList
from .source import AdapterSource, Revision, has_scheme, revision_rule

# What clients put in "model" (OpenAI) or "adapter_id" (TGI): also a URL path segment of the
# runtime's admin API, so no '/'.
SERVED_NAME = r"^[A-Za-z0-9]([-A-Za-z0-9._]{0,126}[A-Za-z0-9])?$"
SERVED_NAME_MAX = 128
ADAPTER_NAME_MAX = 63
MAX_REPLICA_STATUSES = 1000
BASE_MODEL_IMMUTABLE = (
    "baseModel is immutable: delete the LoraAdapter and create it again to move it to another "
    "base model"
)
SECRET_NEEDS_REMOTE = "secretRef is only used by hf://, s3:// and https:// sources"
NAME_RULE = (
    f"metadata.name of a LoraAdapter must be a DNS-1123 label of at most {ADAPTER_NAME_MAX} "
    "characters (lowercase letters, digits and '-'): it is the default servedName"
)


class LoraAdapterSpec(K8sModel):
    """The desired state of a LoraAdapter."""

    cel_rules = (
        revision_rule(),
        Rule(
            cel="!has(self.secretRef) || self.source.startsWith('hf://')"
            " || self.source.startsWith('s3://') || self.source.startsWith('https://')",
            message=SECRET_NEEDS_REMOTE,
            holds=lambda s: s.secret_ref is None or has_scheme(s.source, "hf", "s3", "https"),
            field_path=".secretRef",
        ),
    )

    base_model: Annotated[BaseModelName, Rule(cel="self == oldSelf", message=BASE_MODEL_IMMUTABLE)]
    """Name of the BaseModelDeployment in this namespace that serves the adapter. Immutable."""
    source: AdapterSource
    """Where the PEFT adapter (adapter_config.json and adapter_model.safetensors) is: hf://org/name, s3://bucket/prefix, pvc://claim/path, file:///path or https://host/path (a directory URL)."""
    revision: Revision | None = None
    """Branch, tag or commit of an hf:// repository; the default branch when unset."""
    sha256: Sha256 | None = None
    """Expected SHA-256 of adapter_model.safetensors, lowercase hex. Weights with another digest are refused."""
    served_name: Annotated[str, Field(max_length=SERVED_NAME_MAX, pattern=SERVED_NAME)] | None = (
        None
    )
    """Name clients send as "model" (OpenAI API) or "adapter_id" (TGI API). Defaults to metadata.name; the operator applies the default and reports it in status.servedName without writing the spec."""
    pinned: bool = False
    """Keep the adapter in a GPU slot of every replica: never evicted to make room for others."""
    secret_ref: LocalObjectReference | None = None
    """Secret in this namespace with credentials for the source: HF_TOKEN for hf://; AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL for s3://; BEARER_TOKEN for https://."""


class AdapterState(StrEnum):
    """Where the adapter is on one replica."""

    PENDING = "Pending"
    LOADING = "Loading"
    LOADED = "Loaded"
    UNLOADING = "Unloading"
    FAILED = "Failed"


class ReplicaAdapterStatus(K8sModel):
    """The adapter on one runtime pod."""

    pod: DNSSubdomain
    """Name of the runtime pod."""
    state: AdapterState
    """Pending, Loading, Loaded, Unloading or Failed."""
    message: Annotated[str, Field(max_length=1024)] | None = None
    """Why the state is what it is; the error when Failed."""
    loaded_at: datetime | None = None
    """When the pod finished loading the adapter."""


class AdapterConditionType(StrEnum):
    """Condition types of a LoraAdapter."""

    READY = "Ready"
    LOADED = "Loaded"
    COMPATIBLE = "Compatible"


class LoraAdapterStatus(K8sModel):
    """The observed state of a LoraAdapter, written by the operator."""

    observed_generation: int | None = Field(default=None, ge=0, le=MAX_COUNTER)
    """The metadata.generation this status describes."""
    served_name: Annotated[str, Field(max_length=128)] | None = None
    """The name clients send: spec.servedName, or metadata.name when that is unset."""
    rank: int | None = Field(default=None, ge=1, le=65536)
    """LoRA rank r read from adapter_config.json."""
    target_modules: list[Annotated[str, Field(max_length=128)]] | None = Field(
        default=None, max_length=64
    )
    """Modules of the base model the adapter changes, such as q_proj and v_proj."""
    size_bytes: int | None = Field(default=None, ge=0, le=MAX_COUNTER)
    """Size of the adapter weights."""
    sha256: Sha256 | None = None
    """SHA-256 of the adapter_model.safetensors that was loaded."""
    replicas: list[ReplicaAdapterStatus] | None = Field(
        default=None,
        max_length=MAX_REPLICA_STATUSES,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["pod"]},
    )
    """The adapter on each runtime pod of the base."""
    loaded_replicas: int | None = Field(default=None, ge=0, le=MAX_REPLICA_STATUSES)
    """Ready pods of the base that have the adapter loaded."""
    total_replicas: int | None = Field(default=None, ge=0, le=MAX_REPLICA_STATUSES)
    """Ready pods of the base."""
    loaded: Annotated[str, Field(max_length=16, pattern=r"^[0-9]+/[0-9]+$")] | None = None
    """loadedReplicas/totalReplicas as one string, such as "2/3", for kubectl get."""
    conditions: ConditionList | None = None
    """Ready, Loaded and Compatible."""


def loaded_summary(loaded: int, total: int) -> str:
    """The value of status.loaded."""
    return f"{loaded}/{total}"


class LoraAdapter(K8sModel):
    """A LoRA adapter that every replica of its BaseModelDeployment serves, hot-loaded without
    restarts."""

    api_version: Literal["loraplane.io/v1alpha1"] = "loraplane.io/v1alpha1"
    kind: Literal["LoraAdapter"] = "LoraAdapter"
    metadata: ObjectMeta
    spec: LoraAdapterSpec
    status: LoraAdapterStatus | None = None

    @model_validator(mode="after")
    def _name_is_label(self) -> Any:
        name = self.metadata.name
        if name is not None and (len(name) > ADAPTER_NAME_MAX or not re.match(DNS1123_LABEL, name)):
            raise ValueError(NAME_RULE)
        return self

    @property
    def served_name(self) -> str:
        """What clients send to reach this adapter: spec.servedName or metadata.name."""
        name = self.spec.served_name or self.metadata.name
        if name is None:
            raise ValueError("a LoraAdapter without metadata.name needs spec.servedName")
        return name
