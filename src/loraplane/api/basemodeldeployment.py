"""BaseModelDeployment: one base model served by a fleet of runtime replicas, scaled as one."""

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from .base import (
    BASE_NAME_MAX,
    DNS1035_LABEL,
    MAX_COUNTER,
    K8sModel,
    ObjectMeta,
    Rule,
)
from .conditions import ConditionList
from .container import RuntimeSpec
from .scheduling import Affinity, LabelValue, Toleration
from .source import ModelSource, Revision, revision_rule

MAX_REPLICAS = 1000
# A request rate per replica: a plain decimal with at most three decimals or a milli value,
# never zero: "10", "2.5", "0.25", "2500m". A pattern instead of a float keeps the spec exact
# and lets the API server reject zero without the CEL quantity library.
POSITIVE_RATE = (
    r"^([1-9][0-9]{0,5}(\.[0-9]{1,3})?"
    r"|0?\.(00[1-9]|0[1-9][0-9]?|[1-9][0-9]{0,2})"
    r"|[1-9][0-9]{0,8}m)$"
)
MIN_LE_MAX = "autoscaling.minReplicas must be less than or equal to autoscaling.maxReplicas"
PANIC_LE_STABLE = (
    "autoscaling.panicWindowSeconds must be less than or equal to autoscaling.stableWindowSeconds"
)
RUNNING_LE_BATCH = (
    "maxRunningSequences must be less than or equal to maxBatchTokens: every running sequence "
    "decodes a token in each step, and a step holds at most maxBatchTokens tokens"
)
NAME_RULE = (
    f"metadata.name of a BaseModelDeployment must be a DNS-1035 label of at most {BASE_NAME_MAX} "
    "characters (lowercase letters, digits and '-', starting with a letter): it names the "
    "Deployment and Service"
)


class Dtype(StrEnum):
    """Data type the base model's weights are loaded in."""

    BFLOAT16 = "BFloat16"
    FLOAT16 = "Float16"
    FLOAT32 = "Float32"


class ModelSpec(K8sModel):
    """Where the base model comes from and how it is loaded."""

    cel_rules = (revision_rule(),)

    source: ModelSource
    """Where the weights are: hf://org/name (Hugging Face Hub), s3://bucket/prefix, pvc://claim/path (a PersistentVolumeClaim in this namespace) or file:///path (on the node or in the image)."""
    revision: Revision | None = None
    """Branch, tag or commit of an hf:// repository; the default branch when unset. Pin a commit for reproducible rollouts."""
    dtype: Dtype = Dtype.BFLOAT16
    """BFloat16, Float16 or Float32. Adapters are applied in the same type."""


class Scheduling(K8sModel):
    """Where the runtime pods may run."""

    node_selector: dict[str, LabelValue] | None = Field(default=None, max_length=64)
    """Node labels a node must have, such as the GPU product label."""
    tolerations: list[Toleration] | None = Field(
        default=None, max_length=32, json_schema_extra={"x-kubernetes-list-type": "atomic"}
    )
    """Taints the pods tolerate; GPU nodes are usually tainted."""
    affinity: Affinity | None = None
    """Node and pod affinity, as in a pod spec (for example one replica per node)."""
    priority_class_name: Annotated[str, Field(max_length=253)] | None = None
    """PriorityClass of the pods."""


class AutoscalingSpec(K8sModel):
    """Scaling on the request rate of all adapters together, summed over the replicas.

    desired replicas = ceil(rate / targetRequestsPerSecond), within minReplicas and maxReplicas.
    The rate is averaged over stableWindowSeconds; when the rate over the last
    panicWindowSeconds exceeds panicThreshold percent of what the current replicas are
    meant to serve, the fleet scales up at once and does not scale down until the burst is over.
    """

    cel_rules = (
        Rule(
            cel="!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
            message=MIN_LE_MAX,
            holds=lambda a: a.min_replicas <= a.max_replicas,
            field_path=".minReplicas",
        ),
        Rule(
            cel="!has(self.panicWindowSeconds) || !has(self.stableWindowSeconds)"
            " || self.panicWindowSeconds <= self.stableWindowSeconds",
            message=PANIC_LE_STABLE,
            holds=lambda a: a.panic_window_seconds <= a.stable_window_seconds,
            field_path=".panicWindowSeconds",
        ),
    )

    enabled: bool = False
    """Scale on the request rate. When false, spec.replicas is the replica count."""
    min_replicas: int = Field(default=1, ge=0, le=MAX_REPLICAS)
    """Fewest replicas. 0 lets the fleet scale to zero after scaleToZeroIdleSeconds without requests."""
    max_replicas: int = Field(ge=1, le=MAX_REPLICAS)
    """Most replicas."""
    target_requests_per_second: Annotated[str, Field(max_length=16, pattern=POSITIVE_RATE)]
    """Requests per second one replica should serve, as a positive quantity: a decimal with up to three decimals ("10", "2.5") or milli requests per second ("2500m")."""
    stable_window_seconds: int = Field(default=60, ge=6, le=3600)
    """Window the request rate is averaged over for ordinary decisions."""
    panic_window_seconds: int = Field(default=6, ge=1, le=600)
    """Short window that detects bursts."""
    panic_threshold: int = Field(default=200, ge=110, le=1000)
    """Burst threshold in percent of the current replicas' target rate (200: twice the target)."""
    scale_up_stabilization_seconds: int = Field(default=0, ge=0, le=3600)
    """Scale up only to the lowest replica count wanted during this many seconds."""
    scale_down_stabilization_seconds: int = Field(default=300, ge=0, le=3600)
    """Scale down only to the highest replica count wanted during this many seconds."""
    scale_to_zero_idle_seconds: int = Field(default=900, ge=30, le=86400)
    """With minReplicas 0: seconds without any request before the last replica goes."""


class BaseModelDeploymentSpec(K8sModel):
    """The desired state of a BaseModelDeployment."""

    cel_rules = (
        Rule(
            cel="!has(self.maxRunningSequences) || !has(self.maxBatchTokens)"
            " || self.maxRunningSequences <= self.maxBatchTokens",
            message=RUNNING_LE_BATCH,
            holds=lambda s: s.max_running_sequences <= s.max_batch_tokens,
            field_path=".maxRunningSequences",
        ),
    )

    model: ModelSpec
    """The base model every replica serves."""
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec, json_schema_extra={"default": {}})
    """The runtime container: image, port, environment, GPUs and memory."""
    scheduling: Scheduling | None = None
    """Node selector, tolerations and affinity of the runtime pods."""
    max_adapters: int = Field(default=8, ge=1, le=128)
    """Adapters each replica holds on the GPU at once (GPU slots); more are swapped in on demand."""
    max_cpu_adapters: int = Field(default=32, ge=0, le=1024)
    """Adapters each replica keeps in host memory, ready to move to a GPU slot without a download."""
    max_lora_rank: int = Field(default=64, ge=1, le=256)
    """Largest LoRA rank an adapter may have; it sizes the GPU slot buffers. Adapters above it are rejected as incompatible."""
    max_batch_tokens: int = Field(default=8192, ge=64, le=1048576)
    """Most tokens (prefill and decode, all adapters) in one batch step; longer prompts are prefilled in chunks. It does not size the KV cache."""
    max_running_sequences: int = Field(default=64, ge=1, le=1024)
    """Most sequences decoded together in one step, over all adapters (vLLM's max_num_seqs); more wait in the queue. Each batch size up to it gets a CUDA graph: a larger value serves more streams at once for more graph memory and capture time at start."""
    max_model_len: int | None = Field(default=None, ge=16, le=1048576)
    """Longest sequence (prompt plus max_tokens) a request may ask for; longer ones get a 400. Unset: the model's own limit, within the KV cache."""
    gpu_memory_utilization_percent: int = Field(default=90, ge=10, le=100)
    """Share of each GPU's memory the runtime takes for weights, activations and the KV cache; the KV cache gets what the rest leaves."""
    replicas: int = Field(default=1, ge=0, le=MAX_REPLICAS)
    """Replicas while autoscaling is off; `kubectl scale` sets it. Ignored while autoscaling.enabled is true."""
    autoscaling: AutoscalingSpec | None = None
    """Request-rate autoscaling; off when unset."""


class BaseModelConditionType(StrEnum):
    """Condition types of a BaseModelDeployment."""

    READY = "Ready"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"
    SCALING_ACTIVE = "ScalingActive"


class BaseModelDeploymentStatus(K8sModel):
    """The observed state of a BaseModelDeployment, written by the operator."""

    observed_generation: int | None = Field(default=None, ge=0, le=MAX_COUNTER)
    """The metadata.generation this status describes."""
    replicas: int | None = Field(default=None, ge=0, le=MAX_REPLICAS)
    """Runtime pods that exist (the scale subresource's status replicas)."""
    ready_replicas: int | None = Field(default=None, ge=0, le=MAX_REPLICAS)
    """Pods with the model loaded and ready to serve."""
    desired_replicas: int | None = Field(default=None, ge=0, le=MAX_REPLICAS)
    """Replicas the operator wants now: the autoscaler's decision, or spec.replicas."""
    selector: Annotated[str, Field(max_length=1024)] | None = None
    """Label selector of the pods in string form, for the scale subresource (HPA, kubectl scale)."""
    request_rate: Annotated[str, Field(max_length=64)] | None = None
    """Requests per second over all replicas and adapters, as a quantity such as "12500m"."""
    adapters_ready: int | None = Field(default=None, ge=0, le=100000)
    """LoraAdapters of this base that are Ready."""
    endpoint: Annotated[str, Field(max_length=512)] | None = None
    """URL clients send requests to, such as http://mistral-7b.team-a.svc:8000."""
    last_scale_time: datetime | None = None
    """When the operator last changed the replica count."""
    conditions: ConditionList | None = None
    """Ready, Progressing, Degraded and ScalingActive."""


class BaseModelDeployment(K8sModel):
    """One base model served by a fleet of runtime replicas that hold many LoRA adapters,
    scaled as one on the request rate of all its adapters."""

    api_version: Literal["loraplane.io/v1alpha1"] = "loraplane.io/v1alpha1"
    kind: Literal["BaseModelDeployment"] = "BaseModelDeployment"
    metadata: ObjectMeta
    spec: BaseModelDeploymentSpec
    status: BaseModelDeploymentStatus | None = None

    @model_validator(mode="after")
    def _name_fits_children(self) -> Any:
        name = self.metadata.name
        if name is not None and (len(name) > BASE_NAME_MAX or not re.match(DNS1035_LABEL, name)):
            raise ValueError(NAME_RULE)
        return self
