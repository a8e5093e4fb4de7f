"""The operator on a real control plane with real runtime pods (a tiny model on the CPU).

One fleet is shared by the tests of this module, in order: it becomes Ready with every
adapter verified on every pod, bad adapters are reported without disturbing the others,
deletion unloads everywhere, a replaced pod serves only once it holds its adapters,
scaling, and an operator restart that loses nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.cluster.testing import Kube, delete_namespace, is_ready, new_namespace, wait_for
from operator_helpers import (
    BASE,
    Operator,
    adapter,
    adapter_ready,
    apply,
    base_model,
    complete_text,
    condition,
    fleet_ready,
    held,
    kill_runtime,
    peft_greedy_ids,
    runtime_pods,
)

from loraplane.api.wire import READINESS_GATE


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from loraplane.testing.tiny import TinyAdapterSpec, build_adapter, build_demo

    root = tmp_path_factory.mktemp("operator-models")
    base, adapters = build_demo(root)
    too_big = build_adapter(root / "adapters" / "too-big", base, TinyAdapterSpec(r=32, seed=9))
    return {"base": base, **adapters, "too-big": too_big}


@pytest.fixture(scope="module")
def fleet(kube: Kube, crds: list[str], models: dict[str, Path], tmp_path_factory) -> Iterator[dict]:
    if kube.local is None:
        pytest.skip("runs runtime pods as local processes: needs the node agent")
    ns = new_namespace(kube, "operator")
    op = Operator(kube, ns, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    state = {"ns": ns, "op": op, "models": models}
    try:
        apply(kube, ns, base_model(models["base"], replicas=2))
        for name, extra in (
            ("sql-expert", {}),
            ("poet", {"servedName": "Poet_v2"}),
            ("support-bot", {}),
        ):
            apply(kube, ns, adapter(name, models[name], **extra))
        yield state
    finally:
        op.stop()
        # Shown only when a test of this module failed (pytest keeps captured output).
        print(kube.explain(ns))
        print(f"--- operator log ---\n{op.log.read_text()[-6000:]}")
        delete_namespace(kube, ns)


# ---- the tests, in order -----------------------------------------------------------------


def test_fleet_and_adapters_become_ready_with_verified_residency(kube: Kube, fleet: dict) -> None:
    ns = fleet["ns"]
    wait_for(
        lambda: fleet_ready(kube, ns, 2), 240, "the BaseModelDeployment to be Ready with 2 pods"
    )
    for name in ("sql-expert", "poet", "support-bot"):
        obj = wait_for(lambda n=name: adapter_ready(kube, ns, n, 2), 120, f"{name} Ready on 2 pods")
        status = obj["status"]
        assert len(status["sha256"]) == 64 and status["rank"] > 0, status
        assert {r["state"] for r in status["replicas"]} == {"Loaded"}, status["replicas"]
        assert all(r.get("loadedAt") for r in status["replicas"])
        assert condition(obj, "Compatible")["status"] == "True"
    bmd = kube.get_json("bmd", BASE, "-n", ns)
    assert bmd["status"]["adaptersReady"] == 3 and bmd["status"]["selector"]
    assert condition(bmd, "Degraded")["status"] == "False"

    from transformers import AutoTokenizer

    models = fleet["models"]
    tok = AutoTokenizer.from_pretrained(str(models["base"]))
    expected = {
        served: tok.decode(peft_greedy_ids(models["base"], models[name]), skip_special_tokens=True)
        for served, name in (
            ("sql-expert", "sql-expert"),
            ("Poet_v2", "poet"),
            ("support-bot", "support-bot"),
        )
    }
    assert len(set(expected.values())) == 3, "the adapters must differ to prove anything"
    for pod in runtime_pods(kube, ns):
        gate = condition(pod, READINESS_GATE)
        assert gate["status"] == "True", gate
        for served, text in expected.items():
            assert complete_text(pod, served) == text, (pod["metadata"]["name"], served)


def test_bad_adapters_get_conditions_and_events_while_others_serve(kube: Kube, fleet: dict) -> None:
    ns, models = fleet["ns"], fleet["models"]
    apply(kube, ns, adapter("too-big", models["too-big"]))
    apply(kube, ns, adapter("wrong-digest", models["sql-expert"], sha256="0" * 64))

    def refused(name: str, type_: str) -> dict | None:
        obj = kube.get_json("lora", name, "-n", ns)
        return obj if condition(obj, type_).get("status") == "False" else None

    big = wait_for(lambda: refused("too-big", "Compatible"), 60, "too-big Compatible=False")
    assert "rank 32" in condition(big, "Compatible")["message"], condition(big, "Compatible")
    assert condition(big, "Ready")["status"] == "False"
    digest = wait_for(lambda: refused("wrong-digest", "Loaded"), 60, "wrong-digest Loaded=False")
    assert condition(digest, "Loaded")["reason"] == "LoadFailed"
    assert "sha256" in condition(digest, "Loaded")["message"]

    def warned() -> bool:
        events = kube.get_json("events", "-n", ns)["items"]
        reasons = {(e["involvedObject"]["name"], e["reason"]) for e in events}
        return {("too-big", "LoadFailed"), ("wrong-digest", "LoadFailed")} <= reasons

    wait_for(warned, 30, "a LoadFailed Event on each bad adapter")
    bmd = wait_for(
        lambda: (
            (b := kube.get_json("bmd", BASE, "-n", ns))
            and condition(b, "Degraded").get("status") == "True"
            and b
        ),
        30,
        "the deployment to report Degraded",
    )
    assert "too-big" in condition(bmd, "Degraded")["message"]
    # The neighbours keep serving on every pod.
    assert fleet_ready(kube, ns, 2)
    assert adapter_ready(kube, ns, "sql-expert", 2)
    kube.kubectl("delete", "lora", "too-big", "wrong-digest", "-n", ns, "--wait=true")


def test_deleting_an_adapter_unloads_it_everywhere(kube: Kube, fleet: dict) -> None:
    ns = fleet["ns"]
    kube.kubectl("delete", "lora", "poet", "-n", ns, "--wait=true", timeout=60)
    for pod in runtime_pods(kube, ns):
        assert "Poet_v2" not in held(kube, ns, pod), pod["metadata"]["name"]
    reasons = {
        (e["involvedObject"]["name"], e["reason"])
        for e in kube.get_json("events", "-n", ns)["items"]
    }
    assert ("poet", "Unloaded") in reasons


def test_children_changed_or_deleted_by_hand_are_put_back(kube: Kube, fleet: dict) -> None:
    ns = fleet["ns"]
    kube.kubectl("delete", "service", BASE, f"{BASE}-router", "-n", ns, "--wait=true")
    kube.kubectl("scale", "deployment", BASE, "-n", ns, "--replicas=4")

    def restored() -> bool:
        services = kube.get_json("services", "-n", ns)["items"]
        names = {s["metadata"]["name"] for s in services}
        replicas = kube.get_json("deployment", BASE, "-n", ns)["spec"]["replicas"]
        return {BASE, f"{BASE}-router"} <= names and replicas == 2

    wait_for(restored, 60, "both Services back and the Deployment at spec.replicas again")


def test_a_replaced_pod_takes_traffic_only_with_its_adapters(kube: Kube, fleet: dict) -> None:
    ns = fleet["ns"]
    victim = runtime_pods(kube, ns)[0]["metadata"]["name"]
    kube.kubectl("delete", "pod", victim, "-n", ns, "--wait=false")

    def replacement_ready() -> dict | None:
        pods = [p for p in runtime_pods(kube, ns) if p["metadata"]["name"] != victim]
        new = [p for p in pods if is_ready(p)]
        return new[0] if len(new) == 2 and len(pods) == 2 else None

    wait_for(replacement_ready, 180, "a replacement pod to be Ready")
    for pod in runtime_pods(kube, ns):
        assert {"sql-expert", "support-bot"} <= set(held(kube, ns, pod)), pod["metadata"]["name"]
    wait_for(lambda: adapter_ready(kube, ns, "sql-expert", 2), 60, "sql-expert on both pods")


def test_a_restarted_runtime_serves_again_only_with_its_adapters(kube: Kube, fleet: dict) -> None:
    """kill -9 of the runtime: the pod comes back empty, so its gate closes, and it is Ready
    again only once it holds its adapters (nothing else resets a custom gate)."""
    ns = fleet["ns"]
    pod = runtime_pods(kube, ns)[0]
    name = pod["metadata"]["name"]
    kill_runtime(pod)
    seen_not_ready = []

    def back() -> dict | None:
        p = kube.get_json("pod", name, "-n", ns)
        restarts = p["status"]["containerStatuses"][0].get("restartCount", 0)
        if not is_ready(p):
            seen_not_ready.append(True)
            return None
        return p if restarts >= 1 else None

    p = wait_for(back, 180, f"{name} Ready again after its runtime was killed")
    assert seen_not_ready, "the pod never left service"
    # Ready again means it holds its adapters again: checked at once, not after a while.
    assert {"sql-expert", "support-bot"} <= set(held(kube, ns, p))
    assert condition(p, READINESS_GATE)["status"] == "True"


def test_scaling_out_and_in(kube: Kube, fleet: dict) -> None:
    ns = fleet["ns"]
    kube.kubectl("scale", "bmd", BASE, "-n", ns, "--replicas=3")
    wait_for(lambda: fleet_ready(kube, ns, 3), 240, "3 Ready pods")
    wait_for(lambda: adapter_ready(kube, ns, "support-bot", 3), 60, "support-bot on 3 pods")
    kube.kubectl("scale", "bmd", BASE, "-n", ns, "--replicas=1")
    wait_for(lambda: fleet_ready(kube, ns, 1), 120, "1 Ready pod")
    wait_for(lambda: adapter_ready(kube, ns, "sql-expert", 1), 60, "sql-expert reported on 1 pod")


def test_operator_restart_loses_nothing(kube: Kube, fleet: dict) -> None:
    ns, op, models = fleet["ns"], fleet["op"], fleet["models"]
    op.stop()
    apply(kube, ns, adapter("late", models["poet"]))  # changed while nobody watches
    op.start()
    wait_for(lambda: adapter_ready(kube, ns, "late", 1), 120, "an adapter applied while down")
    assert adapter_ready(kube, ns, "sql-expert", 1)
    assert "loraplane_operator_syncs_total" in wait_for(op.metrics, 30, "operator metrics")
    log = op.log.read_text()
    assert "Forbidden" not in log and " 401" not in log and "Traceback" not in log, log[-4000:]


def test_changing_the_base_keeps_old_pods_serving_until_adapters_fit(
    kube: Kube, fleet: dict, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The new base refuses the adapters: its pod never opens its gate, the old pod serves,
    the adapters say why and the deployment names them; deleting them finishes the rollout."""
    from loraplane.testing.tiny import TinyModelSpec, build_model

    ns = fleet["ns"]
    other = build_model(
        tmp_path_factory.mktemp("other-base") / "smaller", TinyModelSpec(num_hidden_layers=1)
    )
    old_pod = runtime_pods(kube, ns)[0]
    kube.kubectl(
        "patch",
        "bmd",
        BASE,
        "-n",
        ns,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"model": {"source": f"file://{other}"}}}),
    )

    def refused_by_new_base() -> dict | None:
        obj = kube.get_json("lora", "sql-expert", "-n", ns)
        return obj if condition(obj, "Compatible").get("status") == "False" else None

    obj = wait_for(refused_by_new_base, 240, "sql-expert Compatible=False on the new base's pod")
    assert condition(obj, "Compatible")["reason"] == "Incompatible"
    bmd = wait_for(
        lambda: (
            (b := kube.get_json("bmd", BASE, "-n", ns))
            and condition(b, "Degraded").get("status") == "True"
            and b
        ),
        60,
        "Degraded naming the adapters",
    )
    assert "sql-expert" in condition(bmd, "Degraded")["message"]
    pods = runtime_pods(kube, ns)
    new = [p for p in pods if p["metadata"]["name"] != old_pod["metadata"]["name"]]
    assert new and not any(is_ready(p) for p in new), "the new base's pod must stay out of service"
    assert is_ready(kube.get_json("pod", old_pod["metadata"]["name"], "-n", ns))
    assert complete_text(old_pod, "sql-expert")  # the old pod still serves the adapter

    kube.kubectl("delete", "lora", "--all", "-n", ns, "--wait=true", timeout=90)

    def rolled_out() -> bool:
        pods = runtime_pods(kube, ns)
        return (
            len(pods) == 1
            and pods[0]["metadata"]["name"] != old_pod["metadata"]["name"]
            and is_ready(pods[0])
        )

    wait_for(rolled_out, 180, "the rollout to finish once nothing refuses the new base")
