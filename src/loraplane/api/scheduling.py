"""Typed, bounded mirrors of core/v1 Toleration and Affinity, copied as-is into the pod spec.

Field names and meanings are those of core/v1 (a test checks them against the upstream
OpenAPI), so ``to_dict()`` of these is a valid pod spec fragment. Only the bounds are ours:
every list and string has a limit, so the CRD stays structural and cheap for CEL.
"""

from enum import StrEnum
from typing import Annotated

from pydantic import Field
from pydantic.json_schema import JsonDict

from .base import DNSSubdomain, K8sModel, Rule

LabelKey = Annotated[str, Field(min_length=1, max_length=317)]
LabelValue = Annotated[str, Field(max_length=63)]
Values = Annotated[list[LabelValue], Field(max_length=64)]
ATOMIC: JsonDict = {"x-kubernetes-list-type": "atomic"}


class NodeSelectorOperator(StrEnum):
    """How a node label relates to the values."""

    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"
    GT = "Gt"
    LT = "Lt"


class LabelSelectorOperator(StrEnum):
    """How a label relates to the values."""

    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class NodeSelectorRequirement(K8sModel):
    """A node label, an operator and values the label is compared with."""

    key: LabelKey
    """The label key the requirement applies to."""
    operator: NodeSelectorOperator
    """In, NotIn, Exists, DoesNotExist, Gt or Lt."""
    values: Values | None = Field(default=None, json_schema_extra=ATOMIC)
    """Values: non-empty for In and NotIn, empty for Exists and DoesNotExist, one integer for Gt and Lt."""


class NodeSelectorTerm(K8sModel):
    """Requirements on node labels and fields, ANDed."""

    match_expressions: list[NodeSelectorRequirement] | None = Field(
        default=None, max_length=16, json_schema_extra=ATOMIC
    )
    """Requirements on node labels."""
    match_fields: list[NodeSelectorRequirement] | None = Field(
        default=None, max_length=16, json_schema_extra=ATOMIC
    )
    """Requirements on node fields (only metadata.name is supported by Kubernetes)."""


class NodeSelector(K8sModel):
    """Terms ORed together: a node matches if it matches any term."""

    node_selector_terms: list[NodeSelectorTerm] = Field(
        min_length=1, max_length=16, json_schema_extra=ATOMIC
    )
    """The terms, ORed."""


class PreferredSchedulingTerm(K8sModel):
    """A node preference with a weight."""

    weight: int = Field(ge=1, le=100)
    """Weight added to a node's score when it matches, 1 to 100."""
    preference: NodeSelectorTerm
    """The node requirements of this preference."""


class NodeAffinity(K8sModel):
    """Rules on which nodes the pods may or should run."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    """Nodes the pods must run on."""
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] | None = (
        Field(default=None, max_length=16, json_schema_extra=ATOMIC)
    )
    """Nodes the scheduler prefers, by weight."""


class LabelSelectorRequirement(K8sModel):
    """A label, an operator and values the label is compared with."""

    key: LabelKey
    """The label key the requirement applies to."""
    operator: LabelSelectorOperator
    """In, NotIn, Exists or DoesNotExist."""
    values: Values | None = Field(default=None, json_schema_extra=ATOMIC)
    """Values: non-empty for In and NotIn, empty for Exists and DoesNotExist."""


class LabelSelector(K8sModel):
    """A label query; matchLabels and matchExpressions are ANDed; empty matches everything."""

    model_config = {"json_schema_extra": {"x-kubernetes-map-type": "atomic"}}

    match_labels: dict[str, LabelValue] | None = Field(default=None, max_length=64)
    """Labels that must all have these values."""
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        default=None, max_length=16, json_schema_extra=ATOMIC
    )
    """Requirements that must all hold."""


class PodAffinityTerm(K8sModel):
    """Pods (selected by labels, in namespaces) relative to which these pods are placed."""

    label_selector: LabelSelector | None = None
    """The pods this term is about."""
    namespace_selector: LabelSelector | None = None
    """Namespaces to look for those pods in, ORed with namespaces."""
    namespaces: list[DNSSubdomain] | None = Field(
        default=None, max_length=32, json_schema_extra=ATOMIC
    )
    """Namespaces to look for those pods in; empty with no namespaceSelector: this one."""
    topology_key: LabelKey
    """Node label whose value defines the domain (node, zone) of co-location."""
    match_label_keys: list[LabelKey] | None = Field(
        default=None, max_length=16, json_schema_extra=ATOMIC
    )
    """Pod label keys whose values are taken from the incoming pod and ANDed into labelSelector."""
    mismatch_label_keys: list[LabelKey] | None = Field(
        default=None, max_length=16, json_schema_extra=ATOMIC
    )
    """Pod label keys whose values from the incoming pod must not match (NotIn)."""


class WeightedPodAffinityTerm(K8sModel):
    """A pod affinity term with a weight."""

    weight: int = Field(ge=1, le=100)
    """Weight added to a node's score when it matches, 1 to 100."""
    pod_affinity_term: PodAffinityTerm
    """The term."""


class PodAffinity(K8sModel):
    """Place the pods near pods matching these terms."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] | None = Field(
        default=None, max_length=16, json_schema_extra=ATOMIC
    )
    """Terms that must all hold."""
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] | None = (
        Field(default=None, max_length=16, json_schema_extra=ATOMIC)
    )
    """Terms the scheduler prefers, by weight."""


class PodAntiAffinity(PodAffinity):
    """Keep the pods away from pods matching these terms."""


class Affinity(K8sModel):
    """Node affinity, pod affinity and pod anti-affinity of the runtime pods."""

    node_affinity: NodeAffinity | None = None
    """Rules on which nodes the pods may or should run."""
    pod_affinity: PodAffinity | None = None
    """Rules to co-locate the pods with other pods."""
    pod_anti_affinity: PodAntiAffinity | None = None
    """Rules to keep the pods apart from other pods (for example one replica per node)."""


class TolerationOperator(StrEnum):
    """Equal matches key and value; Exists matches any value of the key."""

    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    """The taint effect a toleration matches; empty matches every effect."""

    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(K8sModel):
    """Lets the pods run on nodes with a matching taint (GPU nodes are usually tainted)."""

    cel_rules = (
        Rule(
            cel="!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            message="a toleration with operator Exists must not set value",
            holds=lambda t: t.operator != TolerationOperator.EXISTS or not t.value,
            field_path=".value",
        ),
    )

    key: LabelKey | None = None
    """Taint key; empty with operator Exists matches every taint."""
    operator: TolerationOperator | None = None
    """Equal (the default) or Exists."""
    value: LabelValue | None = None
    """Taint value to match with operator Equal."""
    effect: TaintEffect | None = None
    """NoSchedule, PreferNoSchedule or NoExecute; empty matches all."""
    toleration_seconds: int | None = Field(default=None, ge=0, le=31536000)
    """For NoExecute: how long the pods stay bound after the taint appears; unset is forever."""
