"""The whole system as a user meets it: helm install, kubectl apply, requests through the
deployment's endpoint (its router), pod loss, scaling out, scale to zero and back, bad
manifests, helm upgrade and uninstall.

Runs against the local control plane by default and against the cluster in KUBECONFIG with
LORAPLANE_USE_KUBECONFIG=1 (kind, or a GPU cluster): there, LORAPLANE_E2E_VALUES names the
chart values (images) and LORAPLANE_E2E_MODELS a directory on every node holding what
`python -m e2e.demo` builds under models/ (docs/kind.md). The tests of this module share one
install and one fleet and run in order; on failure the objects, Events and logs are printed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from e2e.cluster import chart
from e2e.cluster.paths import Bins
from e2e.cluster.testing import (
    Kube,
    Timeout,
    delete_namespace,
    is_ready,
    new_namespace,
    service_url,
    wait_for,
)
from loraplane.testing.tiny import DEMO_LESSONS
from loraplane.testing.tiny import DEMO_PROMPT as LESSON_PROMPT

pytestmark = pytest.mark.e2e

RELEASE = "loraplane-e2e"
SYSTEM_NS = "loraplane-e2e-system"
BASE = "tiny-llama"
REPO = Path(__file__).resolve().parents[1]
OTHER_CLUSTER = os.environ.get("LORAPLANE_USE_KUBECONFIG") == "1"
NODE_AGENT = {"loraplane.io/node-agent": "true"}  # real pods on the local cluster run there


def helm(kube: Kube, *args: str, check: bool = True, timeout: float = 240) -> str:
    proc = subprocess.run(
        [str(Bins.default().helm), f"--kubeconfig={kube.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0 or not check, f"helm {' '.join(args)}:\n{proc.stderr}"
    return proc.stdout


def values_args(namespace: str) -> list[str]:
    values = os.environ.get("LORAPLANE_E2E_VALUES") or str(chart.LOCAL_VALUES)
    # The operator watches only the suite's namespace: nothing else on the cluster is touched.
    return [f"--values={values}", f"--set=watchNamespaces={{{namespace}}}"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    given = os.environ.get("LORAPLANE_E2E_MODELS")
    if given:
        root = Path(given)
        adapters = {n: root / "taught" / n for n in ("sql-expert", "support-bot", "poet")}
        return {"base": root / "base", **adapters}
    from loraplane.testing.tiny import build_taught_demo

    cache = Path(os.environ.get("LORAPLANE_CACHE", Path.home() / ".cache" / "loraplane"))
    base, adapters = build_taught_demo(cache / "demo" / "models")
    return {"base": base, **adapters}


@pytest.fixture(scope="module")
def system(kube: Kube, models: dict[str, Path]) -> Iterator[dict]:
    if kube.local is None and not os.environ.get("LORAPLANE_E2E_MODELS"):
        pytest.skip("on another cluster, set LORAPLANE_E2E_MODELS (docs/kind.md)")
    ns = new_namespace(kube, "e2e")
    state: dict = {"ns": ns, "models": models, "failed": False}
    kube.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        str(chart.CHART / "crds"),
        "-f",
        str(chart.CHART / "charts" / "kopf-peering" / "crds"),
    )
    helm(
        kube,
        "upgrade",
        "--install",
        RELEASE,
        str(chart.CHART),
        f"--namespace={SYSTEM_NS}",
        "--create-namespace",
        *values_args(ns),
        "--wait",
        "--timeout=180s",
    )
    try:
        yield state
    finally:
        print(kube.explain(ns))
        print(operator_log(kube)[-6000:])
        delete_namespace(kube, ns)
        helm(kube, "uninstall", RELEASE, f"--namespace={SYSTEM_NS}", "--wait", check=False)
        kube.kubectl("delete", "namespace", SYSTEM_NS, "--wait=true", check=False, timeout=120)


def operator_log(kube: Kube) -> str:
    return kube.kubectl(
        "logs",
        "-n",
        SYSTEM_NS,
        "-l",
        f"app.kubernetes.io/instance={RELEASE}",
        "--tail=-1",
        check=False,
    ).stdout


def apply(kube: Kube, ns: str, *objects: dict) -> None:
    body = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
    kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))


def base_model(path: Path, **spec: object) -> dict:
    return {
        "apiVersion": "loraplane.io/v1alpha1",
        "kind": "BaseModelDeployment",
        "metadata": {"name": BASE},
        "spec": {
            "model": {"source": f"file://{path}"},
            "runtime": {"resources": {"gpus": 0}},
            "maxLoraRank": 16,
            **({} if OTHER_CLUSTER else {"scheduling": {"nodeSelector": NODE_AGENT}}),
            **spec,
        },
    }


def adapter(name: str, path: Path) -> dict:
    return {
        "apiVersion": "loraplane.io/v1alpha1",
        "kind": "LoraAdapter",
        "metadata": {"name": name},
        "spec": {"baseModel": BASE, "source": f"file://{path}"},
    }


def router(kube: Kube, ns: str) -> str:
    return wait_for(
        lambda: service_url(kube.get_json, ns, f"{BASE}-router", f"loraplane.io/router-for={BASE}"),
        120,
        "a ready router endpoint",
    )


def ask(url: str, model: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.completions.create(model=model, prompt=LESSON_PROMPT, max_tokens=16, temperature=0)
    return r.choices[0].text


def runtime_pods(kube: Kube, ns: str) -> list[dict]:
    pods = kube.get_json("pods", "-n", ns, "-l", f"loraplane.io/base-model={BASE}")["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def ready_pods(kube: Kube, ns: str, n: int) -> list[dict] | None:
    pods = runtime_pods(kube, ns)
    return pods if len(pods) == n and all(is_ready(p) for p in pods) else None


# ---- in order ----------------------------------------------------------------------------


def test_install_runs_the_operator(kube: Kube, system: dict) -> None:
    pods = kube.get_json("pods", "-n", SYSTEM_NS, "-l", f"app.kubernetes.io/instance={RELEASE}")
    assert pods["items"] and all(is_ready(p) for p in pods["items"])


def test_bad_manifests_are_rejected_with_their_reason(kube: Kube, system: dict) -> None:
    for path in sorted((REPO / "examples" / "invalid").glob("*.yaml")):
        expect = re.search(r"^# expect: (.+)$", path.read_text(), re.M)
        assert expect, path
        proc = kube.kubectl("apply", "-n", system["ns"], "-f", str(path), check=False)
        assert proc.returncode != 0, f"{path.name} was accepted"
        assert expect.group(1).strip() in proc.stderr, (path.name, proc.stderr)


def test_adapters_answer_through_the_endpoint(kube: Kube, system: dict) -> None:
    ns, m = system["ns"], system["models"]
    apply(kube, ns, base_model(m["base"], replicas=2), *(adapter(n, m[n]) for n in DEMO_LESSONS))
    kube.kubectl(
        "wait",
        "-n",
        ns,
        "--for=condition=Ready",
        "--timeout=300s",
        f"bmd/{BASE}",
        *(f"lora/{n}" for n in DEMO_LESSONS),
        timeout=320,
    )
    bmd = kube.get_json("bmd", BASE, "-n", ns)
    assert bmd["status"]["endpoint"].startswith(f"http://{BASE}-router.{ns}.svc")
    url = router(kube, ns)
    for name, lesson in DEMO_LESSONS.items():
        assert ask(url, name) == lesson, name
    models = httpx.get(f"{url}/v1/models", timeout=30).json()
    assert {BASE, *DEMO_LESSONS} <= {m["id"] for m in models["data"]}


def test_changing_an_adapters_source_changes_its_answers(kube: Kube, system: dict) -> None:
    ns, m = system["ns"], system["models"]
    kube.kubectl(
        "patch",
        "lora",
        "sql-expert",
        "-n",
        ns,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"source": f"file://{m['poet']}"}}),
    )
    url = router(kube, ns)
    wait_for(
        lambda: ask(url, "sql-expert") == DEMO_LESSONS["poet"],
        120,
        "sql-expert to answer as the new source",
    )
    kube.kubectl(
        "patch",
        "lora",
        "sql-expert",
        "-n",
        ns,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"source": f"file://{m['sql-expert']}"}}),
    )
    wait_for(lambda: ask(url, "sql-expert") == DEMO_LESSONS["sql-expert"], 120, "sql-expert back")


def test_a_pod_lost_under_load_loses_no_request(kube: Kube, system: dict) -> None:
    ns = system["ns"]
    url = router(kube, ns)
    results: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=120) as http:
            i = 0
            while not stop.is_set():
                model = list(DEMO_LESSONS)[i % 3]
                r = http.post(
                    f"{url}/v1/completions",
                    json={"model": model, "prompt": "hello", "max_tokens": 4},
                )
                results.append(r.status_code)
                i += 1

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 10, 60, "load to start")
        victim = runtime_pods(kube, ns)[0]["metadata"]["name"]
        kube.kubectl("delete", "pod", victim, "-n", ns, "--wait=true", timeout=120)
        wait_for(lambda: ready_pods(kube, ns, 2), 180, "the replacement pod Ready")
        done = len(results)
        wait_for(lambda: len(results) >= done + 10, 60, "requests after the replacement")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    failed = [code for code in results if code != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {sorted(set(failed))}"


def test_scaling_out_serves_new_pods_only_with_their_adapters(kube: Kube, system: dict) -> None:
    ns = system["ns"]
    kube.kubectl("scale", "bmd", BASE, "-n", ns, "--replicas=3")
    pods = wait_for(lambda: ready_pods(kube, ns, 3), 240, "3 Ready runtime pods")
    for name in DEMO_LESSONS:
        obj = wait_for(
            lambda n=name: (
                (o := kube.get_json("lora", n, "-n", ns))["status"].get("loadedReplicas") == 3 and o
            ),
            60,
            f"{name} on 3 pods",
        )
        assert {r["pod"] for r in obj["status"]["replicas"]} == {
            p["metadata"]["name"] for p in pods
        }


def test_scale_to_zero_and_a_request_wakes_it(kube: Kube, system: dict) -> None:
    ns = system["ns"]
    autoscaling = {
        "enabled": True,
        "minReplicas": 0,
        "maxReplicas": 2,
        "targetRequestsPerSecond": "2",
        "stableWindowSeconds": 10,
        "panicWindowSeconds": 4,
        "scaleDownStabilizationSeconds": 0,
        "scaleToZeroIdleSeconds": 30,
    }
    kube.kubectl(
        "patch",
        "bmd",
        BASE,
        "-n",
        ns,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"autoscaling": autoscaling}}),
    )
    url = router(kube, ns)

    def at_zero() -> dict | None:
        bmd = kube.get_json("bmd", BASE, "-n", ns)
        st = bmd.get("status") or {}
        return bmd if st.get("desiredReplicas") == 0 and not runtime_pods(kube, ns) else None

    bmd = wait_for(at_zero, 180, "the base at zero replicas after 30 s idle")
    ready = next(c for c in bmd["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ScaledToZero"
    started = time.monotonic()
    assert ask(url, "poet") == DEMO_LESSONS["poet"]  # held by the router until a pod is Ready
    system["wake_seconds"] = time.monotonic() - started
    assert runtime_pods(kube, ns)
    print(f"woke from zero in {system['wake_seconds']:.1f} s")


def test_deleting_an_adapter_removes_it_from_the_endpoint(kube: Kube, system: dict) -> None:
    ns = system["ns"]
    kube.kubectl("delete", "lora", "support-bot", "-n", ns, "--wait=true", timeout=120)
    url = router(kube, ns)
    wait_for(
        lambda: (
            "support-bot"
            not in {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
        ),
        60,
        "support-bot gone from /v1/models",
    )
    r = httpx.post(
        f"{url}/v1/completions", json={"model": "support-bot", "prompt": "hi"}, timeout=60
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text


def test_helm_upgrade_keeps_serving(kube: Kube, system: dict) -> None:
    ns = system["ns"]
    helm(
        kube,
        "upgrade",
        RELEASE,
        str(chart.CHART),
        f"--namespace={SYSTEM_NS}",
        *values_args(ns),
        "--set=operator.resyncSeconds=20",
        "--wait",
        "--timeout=180s",
    )
    url = router(kube, ns)
    assert ask(url, "sql-expert") == DEMO_LESSONS["sql-expert"]
    log = operator_log(kube)
    assert "Forbidden" not in log, log[-3000:]


def test_uninstall_leaves_nothing_behind(kube: Kube, system: dict) -> None:
    helm(kube, "uninstall", RELEASE, f"--namespace={SYSTEM_NS}", "--wait")

    def leftovers() -> list[str]:
        names = kube.kubectl(
            "get",
            "all,serviceaccounts,roles,rolebindings,configmaps,secrets",
            "-n",
            SYSTEM_NS,
            "-l",
            f"app.kubernetes.io/instance={RELEASE}",
            "-o",
            "name",
            check=False,
        ).stdout.split()
        return (
            names
            + kube.kubectl(
                "get",
                "clusterroles,clusterrolebindings",
                "-l",
                f"app.kubernetes.io/instance={RELEASE}",
                "-o",
                "name",
            ).stdout.split()
        )

    # The operator's pods end after their grace period, a moment after helm returns.
    left: list[str] = []

    def gone() -> bool:
        left[:] = leftovers()
        return not left

    try:
        wait_for(gone, 90, "nothing of the release left")
    except Timeout:
        raise AssertionError(f"helm uninstall left {left}") from None
    assert kube.kubectl("get", "crd", "loraadapters.loraplane.io", check=False).returncode == 0, (
        "CRDs stay"
    )
