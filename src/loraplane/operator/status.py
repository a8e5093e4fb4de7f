"""Observed state -> status and conditions of both resources; every reason in one enum.

Conditions follow the Kubernetes API conventions and kstatus: `Ready` is the summary that
`kubectl wait --for=condition=Ready` reads, and the abnormal-true `Reconciling` and `Stalled`
are what kstatus (Flux, `kpt live status`) reads, so each tool sees the same story.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from loraplane.api import (
    AdapterConditionType,
    AdapterState,
    BaseModelConditionType,
    BaseModelDeploymentStatus,
    Condition,
    ConditionStatus,
    LoraAdapterStatus,
    ReplicaAdapterStatus,
    loaded_summary,
    set_condition,
)
from loraplane.api.wire import AdapterInfo

from .adaptersync import DesiredAdapter, Failure

RECONCILING = "Reconciling"
STALLED = "Stalled"
T, F, U = ConditionStatus.TRUE, ConditionStatus.FALSE, ConditionStatus.UNKNOWN


class Reason(StrEnum):
    """Every condition reason the operator writes; docs/operator.md says what to do about each."""

    # LoraAdapter
    LOADED = "Loaded"
    LOADING = "Loading"
    NO_READY_REPLICAS = "NoReadyReplicas"
    LOAD_FAILED = "LoadFailed"
    INCOMPATIBLE = "Incompatible"
    COMPATIBLE = "Compatible"
    NOT_CHECKED = "NotCheckedYet"
    BASE_MODEL_NOT_FOUND = "BaseModelNotFound"
    SERVED_NAME_CONFLICT = "ServedNameConflict"
    SECRET_NOT_FOUND = "SecretNotFound"
    # BaseModelDeployment
    REPLICAS_READY = "ReplicasReady"
    WAITING_FOR_REPLICAS = "WaitingForReplicas"
    SCALED_TO_ZERO = "ScaledToZero"
    ROLLING_OUT = "RollingOut"
    ROLLOUT_COMPLETE = "RolloutComplete"
    ADAPTERS_FAILING = "AdaptersFailing"
    REPLICA_FAILURE = "ReplicaFailure"
    ROLLOUT_STUCK = "RolloutStuck"
    AS_EXPECTED = "AsExpected"
    AUTOSCALING_DISABLED = "AutoscalingDisabled"


# ---- LoraAdapter -------------------------------------------------------------------------


@dataclass(frozen=True)
class PodAdapterFacts:
    """One adapter on one pod: the pod's entry for it and the failure remembered there."""

    row: ReplicaAdapterStatus
    info: AdapterInfo | None
    failure: Failure | None


def adapter_status(
    want: DesiredAdapter,
    pods: Sequence[PodAdapterFacts],
    previous: LoraAdapterStatus | None,
) -> LoraAdapterStatus:
    """The status of a LoraAdapter from its rows on every serving pod of its base."""
    total = len(pods)
    loaded = [p for p in pods if p.row.state == AdapterState.LOADED]
    permanent = [p.failure for p in pods if p.failure and p.failure.permanent]
    failing = [p.failure for p in pods if p.failure and not p.failure.permanent]
    conditions = list(previous.conditions or []) if previous else []
    gen = want.generation

    def put(type_: str, status: ConditionStatus, reason: Reason, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(conditions, type_, status, reason, message, gen)

    if permanent:
        put(AdapterConditionType.COMPATIBLE, F, Reason.INCOMPATIBLE, permanent[0].message)
    elif loaded:
        put(AdapterConditionType.COMPATIBLE, T, Reason.COMPATIBLE, "the base model accepted it")
    else:
        put(AdapterConditionType.COMPATIBLE, U, Reason.NOT_CHECKED, "no pod has loaded it yet")

    if total == 0:
        put(AdapterConditionType.LOADED, F, Reason.NO_READY_REPLICAS, _no_replicas())
    elif len(loaded) == total:
        put(AdapterConditionType.LOADED, T, Reason.LOADED, f"loaded on all {total} replicas")
    elif failing:
        put(AdapterConditionType.LOADED, F, Reason.LOAD_FAILED, failing[0].message)
    else:
        put(
            AdapterConditionType.LOADED,
            F,
            Reason.LOADING,
            f"loaded on {len(loaded)} of {total} replicas",
        )

    ready = total > 0 and len(loaded) == total
    if ready:
        put(AdapterConditionType.READY, T, Reason.LOADED, f"served by all {total} replicas")
        put(RECONCILING, F, Reason.LOADED, "")
    else:
        cause = next(
            c
            for c in conditions
            if c.type in (AdapterConditionType.COMPATIBLE, AdapterConditionType.LOADED)
            and c.status != T
        )
        put(AdapterConditionType.READY, F, Reason(cause.reason), cause.message)
        put(RECONCILING, F if permanent else T, Reason(cause.reason), cause.message)
    put(
        STALLED,
        T if permanent else F,
        Reason.INCOMPATIBLE if permanent else Reason.LOADED,
        permanent[0].message if permanent else "",
    )

    facts = next((p.info for p in loaded if p.info), None)
    return LoraAdapterStatus(
        observed_generation=gen,
        served_name=want.served_name,
        rank=facts.rank if facts else (previous.rank if previous else None),
        target_modules=facts.target_modules
        if facts
        else (previous.target_modules if previous else None),
        size_bytes=facts.size_bytes if facts else (previous.size_bytes if previous else None),
        sha256=facts.sha256 if facts else (previous.sha256 if previous else None),
        replicas=[p.row for p in sorted(pods, key=lambda p: p.row.pod)],
        loaded_replicas=len(loaded),
        total_replicas=total,
        loaded=loaded_summary(len(loaded), total),
        conditions=conditions,
    )


def _no_replicas() -> str:
    return "no replica of the base model is ready; the adapter loads as soon as one is"


def blocked_adapter_status(
    generation: int,
    served_name: str,
    reason: Reason,
    message: str,
    previous: LoraAdapterStatus | None,
) -> LoraAdapterStatus:
    """The status of an adapter that cannot be loaded anywhere until something else changes:
    its base is missing, or another adapter of the base already uses its served name."""
    conditions = list(previous.conditions or []) if previous else []
    for type_ in (AdapterConditionType.READY, AdapterConditionType.LOADED):
        conditions = set_condition(conditions, type_, F, reason, message, generation)
    conditions = set_condition(conditions, RECONCILING, T, reason, message, generation)
    conditions = set_condition(conditions, STALLED, F, reason, "", generation)
    return LoraAdapterStatus(
        observed_generation=generation,
        served_name=served_name,
        replicas=[],
        loaded_replicas=0,
        total_replicas=0,
        loaded=loaded_summary(0, 0),
        conditions=conditions,
    )


# ---- BaseModelDeployment ----------------------------------------------------------------


@dataclass(frozen=True)
class FleetFacts:
    """What the operator measured about one base's fleet."""

    generation: int
    desired_replicas: int
    replicas: int  # pods of the Deployment
    ready_replicas: int  # Ready, readiness gate included
    updated_replicas: int
    deployment_observed: bool  # the Deployment controller saw our latest spec
    replica_failure: str | None  # the Deployment's ReplicaFailure message, if any
    rollout_stuck: str | None  # ProgressDeadlineExceeded message, if any
    adapters_ready: int
    failing_adapters: tuple[str, ...]  # adapters Compatible=False or failing to load
    selector: str
    endpoint: str
    request_rate: str | None = None  # a quantity, from the autoscaler's scrapes
    last_scale_time: datetime | None = None
    scaling: tuple[ConditionStatus, str, str] | None = (
        None  # ScalingActive: status, reason, message
    )


def base_status(
    facts: FleetFacts, previous: BaseModelDeploymentStatus | None
) -> BaseModelDeploymentStatus:
    conditions: list[Condition] = list(previous.conditions or []) if previous else []
    gen = facts.generation

    def put(type_: str, status: ConditionStatus, reason: Reason, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(conditions, type_, status, reason, message, gen)

    rolling = (
        not facts.deployment_observed
        or facts.updated_replicas < facts.desired_replicas
        or facts.replicas > facts.desired_replicas
        or facts.ready_replicas < facts.desired_replicas
    )
    if rolling:
        msg = (
            f"{facts.ready_replicas} of {facts.desired_replicas} replicas ready, "
            f"{facts.updated_replicas} updated"
        )
        put(BaseModelConditionType.PROGRESSING, T, Reason.ROLLING_OUT, msg)
    else:
        put(BaseModelConditionType.PROGRESSING, F, Reason.ROLLOUT_COMPLETE, "rollout complete")

    problems = []
    if facts.failing_adapters:
        names = ", ".join(facts.failing_adapters[:10])
        more = len(facts.failing_adapters) - 10
        problems.append(
            (
                Reason.ADAPTERS_FAILING,
                f"adapters that do not load: {names}{f' and {more} more' if more > 0 else ''}; "
                "see their Compatible and Loaded conditions",
            )
        )
    if facts.replica_failure:
        problems.append((Reason.REPLICA_FAILURE, facts.replica_failure))
    if facts.rollout_stuck:
        problems.append((Reason.ROLLOUT_STUCK, facts.rollout_stuck))
    if problems:
        put(BaseModelConditionType.DEGRADED, T, problems[0][0], "; ".join(m for _, m in problems))
    else:
        put(BaseModelConditionType.DEGRADED, F, Reason.AS_EXPECTED, "")

    if facts.desired_replicas == 0:
        put(BaseModelConditionType.READY, T, Reason.SCALED_TO_ZERO, "scaled to zero replicas")
    elif facts.ready_replicas >= facts.desired_replicas and not rolling:
        put(
            BaseModelConditionType.READY,
            T,
            Reason.REPLICAS_READY,
            f"all {facts.desired_replicas} replicas ready with their adapters",
        )
    else:
        put(
            BaseModelConditionType.READY,
            F,
            Reason.WAITING_FOR_REPLICAS,
            f"{facts.ready_replicas} of {facts.desired_replicas} replicas ready",
        )
    if facts.scaling is not None:
        status_, reason, message = facts.scaling
        conditions = set_condition(
            conditions, BaseModelConditionType.SCALING_ACTIVE, status_, reason, message, gen
        )
    stalled = facts.rollout_stuck or facts.replica_failure
    put(
        RECONCILING,
        T if rolling and not stalled else F,
        Reason.ROLLING_OUT if rolling else Reason.ROLLOUT_COMPLETE,
        "",
    )
    put(
        STALLED,
        T if stalled else F,
        Reason.ROLLOUT_STUCK if stalled else Reason.AS_EXPECTED,
        stalled or "",
    )

    return BaseModelDeploymentStatus(
        observed_generation=gen,
        replicas=facts.replicas,
        ready_replicas=facts.ready_replicas,
        desired_replicas=facts.desired_replicas,
        selector=facts.selector,
        request_rate=facts.request_rate or (previous.request_rate if previous else None),
        adapters_ready=facts.adapters_ready,
        endpoint=facts.endpoint,
        last_scale_time=facts.last_scale_time or (previous.last_scale_time if previous else None),
        conditions=conditions,
    )
