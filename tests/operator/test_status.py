"""Observed state -> conditions: each reason where it belongs, kstatus' view consistent with Ready."""

from __future__ import annotations

from loraplane.api import AdapterState, ReplicaAdapterStatus, get_condition
from loraplane.operator.adaptersync import DesiredAdapter, Failure
from loraplane.operator.status import (
    FleetFacts,
    PodAdapterFacts,
    Reason,
    adapter_status,
    base_status,
    blocked_adapter_status,
)

A = DesiredAdapter("a", "A_v1", "file:///a", None, None, False, None, generation=4)


def fact(pod: str, state: AdapterState, failure: Failure | None = None) -> PodAdapterFacts:
    return PodAdapterFacts(
        ReplicaAdapterStatus(pod=pod, state=state, message=failure.message if failure else None),
        None,
        failure,
    )


def cond(status, type_):
    c = get_condition(status.conditions, type_)
    assert c is not None, type_
    return c.status, c.reason


def test_loaded_everywhere_is_ready_and_current() -> None:
    s = adapter_status(A, [fact("p1", AdapterState.LOADED), fact("p2", AdapterState.LOADED)], None)
    assert (s.loaded_replicas, s.total_replicas, s.loaded) == (2, 2, "2/2")
    assert cond(s, "Ready") == ("True", Reason.LOADED)
    assert cond(s, "Reconciling")[0] == "False" and cond(s, "Stalled")[0] == "False"
    assert s.observed_generation == 4 and s.served_name == "A_v1"


def test_incompatible_is_compatible_false_and_stalled() -> None:
    refused = Failure.after(None, A, "incompatible", "rank 32 above 16", 0)
    s = adapter_status(A, [fact("p1", AdapterState.FAILED, refused)], None)
    assert cond(s, "Compatible") == ("False", Reason.INCOMPATIBLE)
    assert cond(s, "Ready") == ("False", Reason.INCOMPATIBLE)
    assert cond(s, "Stalled")[0] == "True" and cond(s, "Reconciling")[0] == "False"


def test_transient_failure_is_loaded_false_and_still_reconciling() -> None:
    down = Failure.after(None, A, "source_unreachable", "connection refused", 0)
    s = adapter_status(
        A, [fact("p1", AdapterState.LOADED), fact("p2", AdapterState.FAILED, down)], None
    )
    assert cond(s, "Loaded") == ("False", Reason.LOAD_FAILED)
    assert cond(s, "Ready") == ("False", Reason.LOAD_FAILED)
    assert cond(s, "Compatible")[0] == "True"
    assert cond(s, "Reconciling")[0] == "True" and cond(s, "Stalled")[0] == "False"


def test_no_replicas_and_transition_times_kept() -> None:
    s = adapter_status(A, [], None)
    assert cond(s, "Loaded") == ("False", Reason.NO_READY_REPLICAS)
    again = adapter_status(A, [], s)
    assert again == s  # nothing changed: no patch needed


def test_blocked_adapters_say_why() -> None:
    s = blocked_adapter_status(1, "x", Reason.BASE_MODEL_NOT_FOUND, "create base b", None)
    assert cond(s, "Ready") == ("False", Reason.BASE_MODEL_NOT_FOUND)
    assert s.loaded == "0/0"


def facts(**kw) -> FleetFacts:
    base = dict(
        generation=2,
        desired_replicas=2,
        replicas=2,
        ready_replicas=2,
        updated_replicas=2,
        deployment_observed=True,
        replica_failure=None,
        rollout_stuck=None,
        adapters_ready=3,
        failing_adapters=(),
        selector="s",
        endpoint="http://x",
    )
    return FleetFacts(**{**base, **kw})


def test_base_ready_rolling_degraded_and_zero() -> None:
    ready = base_status(facts(), None)
    assert cond(ready, "Ready") == ("True", Reason.REPLICAS_READY)
    assert cond(ready, "Progressing")[0] == "False" and cond(ready, "Degraded")[0] == "False"
    rolling = base_status(facts(ready_replicas=1, updated_replicas=1), ready)
    assert cond(rolling, "Ready")[0] == "False" and cond(rolling, "Progressing")[0] == "True"
    assert cond(rolling, "Reconciling")[0] == "True"
    failing = base_status(facts(failing_adapters=("b", "a")), None)
    assert cond(failing, "Degraded") == ("True", Reason.ADAPTERS_FAILING)
    assert cond(failing, "Ready")[0] == "True"  # the fleet serves; the adapters say what fails
    stuck = base_status(facts(ready_replicas=1, rollout_stuck="deadline exceeded"), None)
    assert cond(stuck, "Stalled")[0] == "True" and cond(stuck, "Reconciling")[0] == "False"
    zero = base_status(
        facts(desired_replicas=0, replicas=0, ready_replicas=0, updated_replicas=0), None
    )
    assert cond(zero, "Ready") == ("True", Reason.SCALED_TO_ZERO)
    assert ready.observed_generation == 2 and ready.endpoint == "http://x"
