"""The autoscaler on real runtime pods: load over several adapters and the base scales the
fleet out, silence brings it back, and status, conditions and Events say why."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from e2e.cluster.testing import Kube, delete_namespace, new_namespace, wait_for
from operator_helpers import (
    BASE,
    Operator,
    adapter,
    adapter_ready,
    apply,
    base_model,
    condition,
    runtime_pods,
)

# Each request is short; the target is low so a modest load on 2 cores asks for 2+ replicas.
TARGET = "1"
LOAD_SECONDS = 40


@pytest.fixture
def scaling_fleet(kube: Kube, crds: list[str], tmp_path_factory) -> Iterator[dict]:
    if kube.local is None:
        pytest.skip("runs runtime pods as local processes: needs the node agent")
    from loraplane.testing.tiny import build_demo

    base, adapters = build_demo(tmp_path_factory.mktemp("scaling-models"))
    ns = new_namespace(kube, "autoscaling")
    op = Operator(kube, ns, tmp_path_factory.mktemp("scaling-operator") / "operator.log")
    op.start()
    try:
        autoscaling = {
            "enabled": True,
            "minReplicas": 1,
            "maxReplicas": 3,
            "targetRequestsPerSecond": TARGET,
            "stableWindowSeconds": 10,
            "panicWindowSeconds": 4,
            "scaleDownStabilizationSeconds": 0,
        }
        apply(kube, ns, base_model(base, replicas=1, autoscaling=autoscaling, maxLoraRank=16))
        for name, path in adapters.items():
            apply(kube, ns, adapter(name, path))
        yield {"ns": ns, "op": op, "adapters": list(adapters)}
    finally:
        op.stop()
        print(kube.explain(ns))
        print(f"--- operator log ---\n{op.log.read_text()[-6000:]}")
        delete_namespace(kube, ns)


def drive(kube: Kube, ns: str, models: list[str], stop: threading.Event, sent: list[int]) -> None:
    """Requests spread over the adapters and the base, round robin over the pods there are."""
    with httpx.Client(timeout=30) as client:
        i = 0
        while not stop.is_set():
            pods = [p for p in runtime_pods(kube, ns) if p["status"].get("podIP")]
            for pod in pods:
                model = models[i % len(models)]
                i += 1
                try:
                    client.post(
                        f"http://{pod['status']['podIP']}:8000/v1/completions",
                        json={"model": model, "prompt": [5, 6, 7], "max_tokens": 1},
                    )
                    sent.append(1)
                except httpx.HTTPError:
                    pass  # a pod going away under load; the rate counts what was served


def test_load_over_adapters_scales_out_and_silence_scales_in(
    kube: Kube, scaling_fleet: dict
) -> None:
    ns = scaling_fleet["ns"]
    for name in scaling_fleet["adapters"]:
        wait_for(lambda n=name: adapter_ready(kube, ns, n, 1), 240, f"{name} Ready on 1 pod")
    models = [*scaling_fleet["adapters"], BASE]
    stop, sent = threading.Event(), []
    workers = [
        threading.Thread(target=drive, args=(kube, ns, models, stop, sent)) for _ in range(4)
    ]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 180
    try:

        def scaled_out() -> dict | None:
            bmd = kube.get_json("bmd", BASE, "-n", ns)
            return bmd if (bmd.get("status") or {}).get("desiredReplicas", 0) >= 2 else None

        bmd = wait_for(scaled_out, deadline - time.monotonic(), "desiredReplicas >= 2 under load")
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    assert sum(sent) > 0
    scaling = condition(bmd, "ScalingActive")
    assert scaling["status"] == "True" and scaling["reason"] in ("ScaledUp", "Panic"), scaling
    assert "req/s" in scaling["message"]
    assert bmd["status"]["requestRate"] not in (None, "0")
    assert bmd["status"].get("lastScaleTime")
    deploy = kube.get_json("deployment", BASE, "-n", ns)
    assert deploy["spec"]["replicas"] >= 2
    assert kube.get_json("bmd", BASE, "-n", ns)["spec"].get("replicas", 1) == 1  # spec untouched

    def scaled_in() -> dict | None:
        bmd = kube.get_json("bmd", BASE, "-n", ns)
        return bmd if (bmd.get("status") or {}).get("desiredReplicas") == 1 else None

    bmd = wait_for(scaled_in, 120, "back to 1 replica once the load stops")
    assert condition(bmd, "ScalingActive")["reason"] in ("ScaledDown", "AtMinReplicas", "Stable")
    events = kube.get_json("events", "-n", ns)["items"]
    reasons = {e["reason"] for e in events if e["involvedObject"]["kind"] == "BaseModelDeployment"}
    assert reasons & {"ScaledUp", "Panic"} and "ScaledDown" in reasons, reasons
    metrics = scaling_fleet["op"].metrics()
    assert "loraplane_operator_desired_replicas" in metrics
