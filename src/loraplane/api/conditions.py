"""Status conditions as the Kubernetes API conventions define them, and pure helpers to set them."""

from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import Field

from .base import MAX_COUNTER, K8sModel

# The conventions' reason grammar (metav1.Condition): CamelCase words, no spaces.
REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
CONDITION_TYPE = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
MAX_CONDITIONS = 16


class ConditionStatus(StrEnum):
    """Whether the condition holds: True, False, or Unknown while it cannot be told."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(K8sModel):
    """One aspect of the object's state, with the reason for it and when it last changed."""

    type: Annotated[str, Field(max_length=316, pattern=CONDITION_TYPE)]
    """Type of the condition in CamelCase, such as Ready."""
    status: ConditionStatus
    """Status of the condition: True, False or Unknown."""
    reason: Annotated[str, Field(min_length=1, max_length=1024, pattern=REASON)]
    """Programmatic identifier of the cause of the last transition, in CamelCase."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """Human-readable details of the last transition: what happened and what to do."""
    last_transition_time: datetime
    """When the status last changed (not when the condition was last checked)."""
    observed_generation: int | None = Field(default=None, ge=0, le=MAX_COUNTER)
    """The metadata.generation the condition was computed from."""


def now() -> datetime:
    """The current time at the precision of metav1.Time (seconds), in UTC."""
    return datetime.now(UTC).replace(microsecond=0)


def get_condition(conditions: Sequence[Condition] | None, type_: str) -> Condition | None:
    """The condition of this type, or None."""
    return next((c for c in conditions or () if c.type == type_), None)


def is_condition_true(conditions: Sequence[Condition] | None, type_: str) -> bool:
    found = get_condition(conditions, type_)
    return found is not None and found.status == ConditionStatus.TRUE


def set_condition(
    conditions: Sequence[Condition] | None,
    type_: str,
    status: ConditionStatus | str,
    reason: str,
    message: str = "",
    observed_generation: int | None = None,
    at: datetime | None = None,
) -> list[Condition]:
    """A new list with this condition set, the others unchanged and in their order.

    lastTransitionTime moves only when the status changes, so a reconcile loop can call this
    on every pass without making the time meaningless; reason, message and
    observedGeneration always take the new values. The input is never mutated.
    """
    status = ConditionStatus(status)
    old = get_condition(conditions, type_)
    unchanged = old is not None and old.status == status
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=old.last_transition_time if old and unchanged else at or now(),
        observed_generation=observed_generation,
    )
    if old is None:
        return [*(conditions or ()), new]
    return [new if c.type == type_ else c for c in conditions or ()]


def remove_condition(conditions: Sequence[Condition] | None, type_: str) -> list[Condition]:
    """A new list without the condition of this type."""
    return [c for c in conditions or () if c.type != type_]


def conditions_changed(old: Sequence[Condition] | None, new: Sequence[Condition] | None) -> bool:
    """Whether a status patch is needed: any difference apart from the order."""
    key = {c.type: c for c in old or ()}
    return len(key) != len(new or ()) or any(key.get(c.type) != c for c in new or ())


ConditionList = Annotated[
    list[Condition],
    Field(
        max_length=MAX_CONDITIONS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    ),
]
