"""The runtime container of a BaseModelDeployment: image, port, environment and resources."""

from enum import StrEnum
from typing import Annotated

from pydantic import Field, model_validator

from .base import DNSSubdomain, K8sModel, Quantity, Rule

ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
IMAGE = r"^[^\s]+$"
EXTENDED_RESOURCE = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
MAX_ENV = 64
ENV_VALUE_OR_FROM = "env: set either value or valueFrom, not both"
ENV_FROM_EXACTLY_ONE = "valueFrom needs exactly one of secretKeyRef, configMapKeyRef or fieldRef"


class KeySelector(K8sModel):
    """A key of a Secret or ConfigMap in the same namespace."""

    name: DNSSubdomain
    """Name of the Secret or ConfigMap."""
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
    """The key to read."""
    optional: bool | None = None
    """Whether the pod may start when the object or key is missing."""


class FieldSelector(K8sModel):
    """A field of the pod, such as metadata.name or status.podIP."""

    field_path: Annotated[str, Field(min_length=1, max_length=256)]
    """Path of the field, such as status.podIP."""
    api_version: Annotated[str, Field(max_length=64)] | None = None
    """Version of the schema the path is written in; defaults to v1."""


class EnvVarSource(K8sModel):
    """Where an environment variable's value comes from: exactly one of the references."""

    cel_rules = (
        Rule(
            cel="(has(self.secretKeyRef) ? 1 : 0) + (has(self.configMapKeyRef) ? 1 : 0)"
            " + (has(self.fieldRef) ? 1 : 0) == 1",
            message=ENV_FROM_EXACTLY_ONE,
            holds=lambda s: [s.secret_key_ref, s.config_map_key_ref, s.field_ref].count(None) == 2,
        ),
    )

    secret_key_ref: KeySelector | None = None
    """A key of a Secret (tokens, credentials)."""
    config_map_key_ref: KeySelector | None = None
    """A key of a ConfigMap."""
    field_ref: FieldSelector | None = None
    """A field of the pod."""


class EnvVar(K8sModel):
    """An environment variable of the runtime container."""

    cel_rules = (
        Rule(
            cel="!has(self.value) || !has(self.valueFrom)",
            message=ENV_VALUE_OR_FROM,
            holds=lambda e: e.value is None or e.value_from is None,
        ),
    )

    name: Annotated[str, Field(min_length=1, max_length=256, pattern=ENV_NAME)]
    """Name of the variable."""
    value: Annotated[str, Field(max_length=4096)] | None = None
    """Literal value; $(VAR) references to earlier variables are expanded."""
    value_from: EnvVarSource | None = None
    """Read the value from a Secret, a ConfigMap or a field of the pod instead."""


class ComputeResources(K8sModel):
    """CPU, memory and local storage, as Kubernetes quantities."""

    cpu: Quantity | None = None
    """CPU cores, such as "4" or "500m"."""
    memory: Quantity | None = None
    """Memory, such as "32Gi". Host memory also holds the CPU adapter cache (maxCpuAdapters)."""
    ephemeral_storage: Quantity | None = None
    """Local disk for downloaded weights when no volume is mounted, such as "100Gi"."""


class Resources(K8sModel):
    """What each replica needs: GPUs, and CPU and memory requests and limits."""

    gpus: int = Field(default=1, ge=0, le=8)
    """GPUs per replica, requested and limited as gpuResourceName. 0 runs on the CPU (tests, demos)."""
    gpu_resource_name: Annotated[str, Field(max_length=253, pattern=EXTENDED_RESOURCE)] = (
        "nvidia.com/gpu"
    )
    """The extended resource a GPU is scheduled as."""
    requests: ComputeResources | None = None
    """Minimum CPU, memory and storage the scheduler reserves."""
    limits: ComputeResources | None = None
    """Most CPU, memory and storage the container may use."""


class PullPolicy(StrEnum):
    """When the kubelet pulls the image."""

    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class RuntimeSpec(K8sModel):
    """The loraplane runtime container every replica runs."""

    image: Annotated[str, Field(max_length=512, pattern=IMAGE)] | None = None
    """Runtime image; the operator uses the runtime image of its own release when unset."""
    image_pull_policy: PullPolicy | None = None
    """Always, IfNotPresent or Never; Kubernetes' default when unset."""
    image_pull_secrets: list[DNSSubdomain] | None = Field(default=None, max_length=8)
    """Names of Secrets in this namespace to pull the image with."""
    port: int = Field(default=8000, ge=1, le=65535)
    """Port the runtime serves HTTP on (APIs, /metrics, health)."""
    env: list[EnvVar] | None = Field(
        default=None,
        max_length=MAX_ENV,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """Extra environment variables (HF_TOKEN from a Secret, cache paths, log level)."""
    resources: Resources = Field(default_factory=Resources, json_schema_extra={"default": {}})
    """GPUs, CPU and memory of each replica."""

    @model_validator(mode="after")
    def _unique_env_names(self) -> "RuntimeSpec":
        names = [e.name for e in self.env or ()]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"env: Duplicate value: {duplicates} appear more than once; each name may appear once"
            )
        return self
