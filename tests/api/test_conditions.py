"""Condition helpers: set, replace, keep lastTransitionTime while the status holds."""

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from loraplane.api import (
    Condition,
    ConditionStatus,
    conditions_changed,
    get_condition,
    is_condition_true,
    remove_condition,
    set_condition,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 1, 2, tzinfo=UTC)


def test_set_appends_a_new_condition():
    conditions = set_condition(None, "Ready", "False", "ModelLoading", "loading", 3, at=T0)
    assert conditions == [
        Condition(
            type="Ready",
            status=ConditionStatus.FALSE,
            reason="ModelLoading",
            message="loading",
            last_transition_time=T0,
            observed_generation=3,
        )
    ]


def test_same_status_keeps_the_transition_time_but_takes_the_new_words():
    first = set_condition([], "Ready", "False", "ModelLoading", "loading", 1, at=T0)
    again = set_condition(first, "Ready", "False", "Downloading", "42% downloaded", 2, at=T1)
    (ready,) = again
    assert ready.last_transition_time == T0
    assert (ready.reason, ready.message, ready.observed_generation) == (
        "Downloading",
        "42% downloaded",
        2,
    )


def test_status_change_moves_the_transition_time():
    first = set_condition([], "Ready", "False", "ModelLoading", at=T0)
    ready = get_condition(set_condition(first, "Ready", "True", "AllReplicasReady", at=T1), "Ready")
    assert ready is not None and ready.last_transition_time == T1


def test_other_conditions_keep_their_place_and_input_is_untouched():
    conditions = set_condition([], "Ready", "True", "AllReplicasReady", at=T0)
    conditions = set_condition(conditions, "Degraded", "False", "AsExpected", at=T0)
    before = [c.model_copy() for c in conditions]
    after = set_condition(conditions, "Ready", "False", "ReplicaLost", at=T1)
    assert [c.type for c in after] == ["Ready", "Degraded"]
    assert conditions == before
    assert after[1] is conditions[1]


def test_queries_and_removal():
    conditions = set_condition([], "Ready", ConditionStatus.TRUE, "AllReplicasReady", at=T0)
    assert is_condition_true(conditions, "Ready")
    assert not is_condition_true(conditions, "Degraded")
    assert get_condition(None, "Ready") is None
    assert remove_condition(conditions, "Ready") == []


def test_changed_ignores_order_only():
    a = set_condition([], "Ready", "True", "AllReplicasReady", at=T0)
    a = set_condition(a, "Degraded", "False", "AsExpected", at=T0)
    assert not conditions_changed(a, list(reversed(a)))
    assert conditions_changed(a, set_condition(a, "Ready", "True", "Other", at=T0))
    assert conditions_changed(a, a[:1])


def test_default_time_is_now_in_utc_at_second_precision():
    (c,) = set_condition([], "Ready", "Unknown", "Starting")
    assert c.last_transition_time.tzinfo is not None and c.last_transition_time.microsecond == 0


@pytest.mark.parametrize("reason", ["", "not camel case", "Bad!"])
def test_reason_must_be_camel_case(reason):
    with pytest.raises(ValidationError):
        set_condition([], "Ready", "True", reason)


def test_serializes_like_metav1_condition():
    (c,) = set_condition([], "Ready", "True", "AllReplicasReady", "ok", 5, at=T0)
    assert c.to_dict() == {
        "type": "Ready",
        "status": "True",
        "reason": "AllReplicasReady",
        "message": "ok",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
        "observedGeneration": 5,
    }
