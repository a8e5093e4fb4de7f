"""The Argo CD health checks (deploy/argocd/*.lua) run in Lua 5.1, Argo CD's dialect, against
the status the operator's own status functions write, in every state docs/operator.md lists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lupa.lua51 as lua51
import pytest
import yaml

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

ARGOCD = Path(__file__).resolve().parents[2] / "deploy" / "argocd"
SCRIPTS = {
    "LoraAdapter": ARGOCD / "health-loraadapter.lua",
    "BaseModelDeployment": ARGOCD / "health-basemodeldeployment.lua",
}
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing"}
GEN = 4


def health(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    """What Argo CD would show: the script run with `obj` set, as its Lua VM does."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value: Any) -> Any:
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value

    lua.globals().obj = to_lua(obj)
    hs = lua.execute(SCRIPTS[kind].read_text())
    status, message = hs["status"], hs["message"]
    assert status in ARGO_STATUSES, status
    assert isinstance(message, str)
    return status, message


def adapter_obj(status: Any, generation: int = GEN) -> dict[str, Any]:
    return {
        "apiVersion": "loraplane.io/v1alpha1",
        "kind": "LoraAdapter",
        "metadata": {"name": "a", "namespace": "team-a", "generation": generation},
        "spec": {"baseModel": "b", "source": "file:///a"},
        **({"status": status.to_dict()} if status is not None else {}),
    }


WANT = DesiredAdapter("a", "A_v1", "file:///a", None, None, False, None, generation=GEN)


def on(pod: str, state: AdapterState, failure: Failure | None = None) -> PodAdapterFacts:
    row = ReplicaAdapterStatus(pod=pod, state=state, message=failure.message if failure else None)
    return PodAdapterFacts(row, None, failure)


def refused(code: str, message: str) -> Failure:
    return Failure.after(None, WANT, code, message, 0)


ADAPTER_CASES = {
    "loaded everywhere": (
        adapter_status(WANT, [on("p1", AdapterState.LOADED), on("p2", AdapterState.LOADED)], None),
        "Healthy",
        "served by all 2 replicas",
    ),
    "loading": (
        adapter_status(WANT, [on("p1", AdapterState.LOADED), on("p2", AdapterState.LOADING)], None),
        "Progressing",
        "loaded on 1 of 2 replicas",
    ),
    "no replica yet": (adapter_status(WANT, [], None), "Progressing", "no pod has loaded it yet"),
    "incompatible": (
        adapter_status(
            WANT, [on("p1", AdapterState.FAILED, refused("incompatible", "rank 32 above 16"))], None
        ),
        "Degraded",
        "rank 32 above 16",
    ),
    "source failing": (
        adapter_status(
            WANT,
            [
                on("p1", AdapterState.LOADED),
                on("p2", AdapterState.FAILED, refused("source_unreachable", "connection refused")),
            ],
            None,
        ),
        "Degraded",
        "LoadFailed: connection refused",
    ),
    "base missing": (
        blocked_adapter_status(GEN, "a", Reason.BASE_MODEL_NOT_FOUND, "create base b", None),
        "Degraded",
        "BaseModelNotFound: create base b",
    ),
    "served name taken": (
        blocked_adapter_status(GEN, "a", Reason.SERVED_NAME_CONFLICT, "older adapter x", None),
        "Degraded",
        "ServedNameConflict",
    ),
}


@pytest.mark.parametrize("status,expected,says", ADAPTER_CASES.values(), ids=ADAPTER_CASES.keys())
def test_lora_adapter_health(status: Any, expected: str, says: str) -> None:
    got, message = health("LoraAdapter", adapter_obj(status))
    assert got == expected, message
    assert says in message
    # Healthy exactly when `kubectl wait --for=condition=Ready` would return.
    ready = get_condition(status.conditions, "Ready")
    assert (got == "Healthy") == (ready is not None and ready.status == "True")


def test_lora_adapter_before_the_operator_saw_its_spec_is_progressing() -> None:
    assert health("LoraAdapter", adapter_obj(None))[0] == "Progressing"
    loaded = ADAPTER_CASES["loaded everywhere"][0]
    # A new spec (generation 5) with the status of generation 4: that Ready is about the past.
    got, message = health("LoraAdapter", adapter_obj(loaded, generation=GEN + 1))
    assert (got, message) == ("Progressing", "waiting for the operator to observe generation 5")


def fleet(**kw: Any) -> FleetFacts:
    facts: dict[str, Any] = dict(
        generation=GEN,
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
        endpoint="http://b-router.team-a.svc:8000",
    )
    return FleetFacts(**{**facts, **kw})


def base_obj(status: Any, autoscaling: bool = False, generation: int = GEN) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": {"source": "hf://org/m"}, "replicas": 2}
    if autoscaling:
        spec["autoscaling"] = {"enabled": True, "minReplicas": 0, "maxReplicas": 4}
    return {
        "apiVersion": "loraplane.io/v1alpha1",
        "kind": "BaseModelDeployment",
        "metadata": {"name": "b", "namespace": "team-a", "generation": generation},
        "spec": spec,
        **({"status": status.to_dict()} if status is not None else {}),
    }


ZERO = dict(desired_replicas=0, replicas=0, ready_replicas=0, updated_replicas=0)
BASE_CASES = {
    "ready": (base_status(fleet(), None), False, "Healthy", "all 2 replicas ready"),
    "rolling out": (
        base_status(fleet(ready_replicas=1, updated_replicas=1), None),
        False,
        "Progressing",
        "1 of 2 replicas ready",
    ),
    "serving with failing adapters": (
        base_status(fleet(failing_adapters=("x",)), None),
        False,
        "Healthy",
        "adapters that do not load: x",
    ),
    "rollout stuck": (
        base_status(fleet(ready_replicas=1, rollout_stuck="progress deadline exceeded"), None),
        False,
        "Degraded",
        "progress deadline exceeded",
    ),
    "pods refused": (
        base_status(fleet(ready_replicas=0, replica_failure="exceeded quota: gpu"), None),
        False,
        "Degraded",
        "exceeded quota: gpu",
    ),
    "zero by spec.replicas": (base_status(fleet(**ZERO), None), False, "Suspended", "zero"),
    "autoscaled to zero": (base_status(fleet(**ZERO), None), True, "Healthy", "scaled to zero"),
}


@pytest.mark.parametrize(
    "status,autoscaling,expected,says", BASE_CASES.values(), ids=BASE_CASES.keys()
)
def test_base_model_deployment_health(
    status: Any, autoscaling: bool, expected: str, says: str
) -> None:
    got, message = health("BaseModelDeployment", base_obj(status, autoscaling))
    assert got == expected, message
    assert says in message
    ready = get_condition(status.conditions, "Ready")
    assert ready is not None
    assert (got in ("Healthy", "Suspended")) == (ready.status == "True")


def test_base_before_the_operator_saw_its_spec_is_progressing() -> None:
    assert health("BaseModelDeployment", base_obj(None))[0] == "Progressing"
    ready = BASE_CASES["ready"][0]
    assert health("BaseModelDeployment", base_obj(ready, generation=GEN + 1))[0] == "Progressing"


def test_argocd_cm_carries_the_tested_scripts() -> None:
    data = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())["data"]
    assert data == {
        f"resource.customizations.health.loraplane.io_{kind}": path.read_text()
        for kind, path in SCRIPTS.items()
    }
