"""The two resources (BaseModelDeployment, LoraAdapter): the single source of truth for the CRDs."""

from .base import K8sModel, LocalObjectReference, ObjectMeta, Rule
from .basemodeldeployment import (
    AutoscalingSpec,
    BaseModelConditionType,
    BaseModelDeployment,
    BaseModelDeploymentSpec,
    BaseModelDeploymentStatus,
    Dtype,
    ModelSpec,
    Scheduling,
)
from .conditions import (
    Condition,
    ConditionStatus,
    conditions_changed,
    get_condition,
    is_condition_true,
    remove_condition,
    set_condition,
)
from .container import EnvVar, Resources, RuntimeSpec
from .groupversion import (
    API_VERSION,
    BASE_MODEL_DEPLOYMENT,
    CATEGORY,
    GROUP,
    LORA_ADAPTER,
    VERSION,
    ResourceNames,
)
from .loraadapter import (
    AdapterConditionType,
    AdapterState,
    LoraAdapter,
    LoraAdapterSpec,
    LoraAdapterStatus,
    ReplicaAdapterStatus,
    loaded_summary,
)
from .quantity import format_milli, parse_quantity, to_milli

__all__ = [
    "API_VERSION",
    "BASE_MODEL_DEPLOYMENT",
    "CATEGORY",
    "GROUP",
    "LORA_ADAPTER",
    "VERSION",
    "AdapterConditionType",
    "AdapterState",
    "AutoscalingSpec",
    "BaseModelConditionType",
    "BaseModelDeployment",
    "BaseModelDeploymentSpec",
    "BaseModelDeploymentStatus",
    "Condition",
    "ConditionStatus",
    "Dtype",
    "EnvVar",
    "K8sModel",
    "LocalObjectReference",
    "LoraAdapter",
    "LoraAdapterSpec",
    "LoraAdapterStatus",
    "ModelSpec",
    "ObjectMeta",
    "ReplicaAdapterStatus",
    "ResourceNames",
    "Resources",
    "Rule",
    "RuntimeSpec",
    "Scheduling",
    "conditions_changed",
    "format_milli",
    "get_condition",
    "is_condition_true",
    "loaded_summary",
    "parse_quantity",
    "remove_condition",
    "set_condition",
    "to_milli",
]
