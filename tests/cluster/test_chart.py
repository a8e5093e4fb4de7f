"""The Helm chart: lint, renders valid objects in every mode, refuses bad values readably, and
installs into the local cluster and uninstalls leaving nothing but CRDs."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from e2e.cluster import chart
from e2e.cluster.paths import versions
from e2e.cluster.testing import Kube, is_ready, wait_for

from loraplane.operator.config import ENV, OperatorConfig

K8S = versions()["K8S_VERSION"].lstrip("v")  # kubernetes-validate schemas of our cluster
APP_VERSION = yaml.safe_load((chart.CHART / "Chart.yaml").read_text())["appVersion"]
# Variables the chart sets besides OperatorConfig's: kopf's identity and the log level.
OTHER_ENV = {"POD_ID", "LORAPLANE_LOG_LEVEL"}
# OperatorConfig variables the chart leaves unset on purpose: the operator draws a random
# priority per replica, which one pod template cannot.
UNSET_ENV = {"LORAPLANE_PRIORITY"}

VARIANTS = {
    "defaults": [],
    "standalone": ["--set=leaderElection.enabled=false"],
    "namespaced": ["--set=watchNamespaces={team-a,team-b}"],
    "namespaced-standalone": [
        "--set=watchNamespaces={team-a}",
        "--set=leaderElection.enabled=false",
    ],
    "two-replicas": ["--set=replicaCount=2"],
    "local": [f"--values={chart.LOCAL_VALUES}"],
    "bring-your-own": [
        "--set=rbac.create=false",
        "--set=serviceAccount.create=false",
        "--set=serviceAccount.name=ops",
        "--set=image.digest=sha256:" + "a" * 64,
        "--set=metrics.podAnnotations=false",
    ],
}


def helm(helm_bin: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm_bin), *args], capture_output=True, text=True, timeout=120, check=False
    )


def render(helm_bin: Path, *values: str) -> list[dict]:
    text = chart.render(helm_bin, "lp", "--namespace=lp-system", "--include-crds", *values)
    return [d for d in yaml.safe_load_all(text) if d]


def one(docs: list[dict], kind: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def container_env(docs: list[dict]) -> dict[str, dict]:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


def validate(docs: list[dict]) -> None:
    """Built-in kinds against Kubernetes' own schemas (strict: unknown fields fail); our and
    kopf's custom objects against the CRDs rendered beside them."""
    schemas = {}
    for crd in (d for d in docs if d["kind"] == "CustomResourceDefinition"):
        spec = crd["spec"]
        for v in spec["versions"]:
            key = (f"{spec['group']}/{v['name']}", spec["names"]["kind"])
            schemas[key] = v["schema"]["openAPIV3Schema"]
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in schemas:
            jsonschema.validate(doc, schemas[key])
        else:
            kubernetes_validate.validate(doc, K8S, strict=True)


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_lint_strict(helm_bin: Path, values: list[str]) -> None:
    out = helm(helm_bin, "lint", "--strict", f"--kube-version={K8S}", str(chart.CHART), *values)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_renders_valid_objects(helm_bin: Path, values: list[str]) -> None:
    docs = render(helm_bin, *values)
    validate(docs)
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "Deployment"} <= kinds
    for doc in docs:
        if doc["kind"] == "CustomResourceDefinition":
            continue  # shared with other releases: no release labels
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "lp", doc["metadata"]
        assert labels["app.kubernetes.io/version"] == APP_VERSION
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_operator_env_is_what_the_operator_reads(helm_bin: Path) -> None:
    env = container_env(render(helm_bin))
    assert set(env) == (set(ENV) - UNSET_ENV) | OTHER_ENV
    assert env["LORAPLANE_BIND_ADDRESS"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # Every value parses as the operator parses it, to the documented defaults.
    plain = {k: e["value"] for k, e in env.items() if "value" in e}
    config = OperatorConfig.from_env(plain)
    assert config.namespaces == ()
    assert config.peering == "lp-loraplane"
    assert config.runtime_image == f"ghcr.io/loraplane/runtime:{APP_VERSION}"
    assert config.runtime_command == ("loraplane-runtime",)
    assert (config.metrics_port, config.health_port) == (8080, 8081)
    defaults = OperatorConfig()
    for field in (
        "sync_concurrency",
        "resync_seconds",
        "autoscale_seconds",
        "load_timeout_seconds",
        "cache_root",
    ):
        assert getattr(config, field) == getattr(defaults, field), field


def test_deployment_follows_the_values(helm_bin: Path) -> None:
    docs = render(
        helm_bin,
        "--set=watchNamespaces={team-a,team-b}",
        "--set=image.tag=1.2.3",
        "--set=metrics.port=9100",
        "--set=nodeSelector.pool=ops",
        "--set=leaderElection.peeringName=lead",
    )
    deploy = one(docs, "Deployment")
    pod = deploy["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "ghcr.io/loraplane/operator:1.2.3"
    assert container["command"] == ["loraplane-operator"]
    env = {k: e.get("value") for k, e in container_env(docs).items()}
    assert env["LORAPLANE_NAMESPACES"] == "team-a,team-b"
    assert env["LORAPLANE_PEERING"] == "lead"
    assert env["LORAPLANE_METRICS_PORT"] == "9100"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9100, "health": 8081}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9100"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["nodeSelector"] == {"pool": "ops"}
    assert deploy["spec"]["strategy"]["type"] == "RollingUpdate"
    peerings = [d for d in docs if d["kind"] == "KopfPeering"]
    assert {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings} == {
        ("team-a", "lead"),
        ("team-b", "lead"),
    }
    assert not [d for d in docs if d["kind"] == "ClusterKopfPeering"]


def test_standalone_has_no_peering_and_recreates(helm_bin: Path) -> None:
    docs = render(helm_bin, "--set=leaderElection.enabled=false")
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert not {n for n in names if n.endswith(".kopf.dev")}
    assert not [d for d in docs if d["kind"] in ("ClusterKopfPeering", "KopfPeering")]
    assert container_env(docs)["LORAPLANE_PEERING"]["value"] == ""  # kopf --standalone
    assert one(docs, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}


BAD = {
    "wrong type": (["--set=replicaCount=many"], "/replicaCount"),
    "unknown key": (["--set=imagee.tag=1"], "additional properties 'imagee' not allowed"),
    "enum": (["--set=image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    "namespace name": (["--set=watchNamespaces={Team_A}"], "/watchNamespaces/0"),
    "port": (["--set=health.port=70000"], "/health/port"),
    "command with spaces": (["--set=runtime.command={python -m x}"], "/runtime/command/0"),
    "standalone replicas": (
        ["--set=replicaCount=2", "--set=leaderElection.enabled=false"],
        "replicaCount is 2 but leaderElection.enabled is false",
    ),
    "same ports": (["--set=metrics.port=8081"], "metrics.port and health.port are both 8081"),
    "service account": (
        ["--set=serviceAccount.create=false"],
        "serviceAccount.name must name an existing ServiceAccount",
    ),
}


@pytest.mark.parametrize("values,message", BAD.values(), ids=BAD.keys())
def test_bad_values_are_refused_readably(helm_bin: Path, values: list[str], message: str) -> None:
    out = helm(helm_bin, "template", "lp", str(chart.CHART), f"--kube-version={K8S}", *values)
    assert out.returncode != 0, out.stdout[:500]
    assert message in out.stderr, out.stderr


# -- the chart installed into the local cluster ----------------------------------------------
@pytest.fixture
def local(kube: Kube) -> Kube:
    if kube.local is None:
        pytest.skip("installs the operator as a node-agent process of the local control plane")
    return kube


def leftovers(kube: Kube, ns: str, release: str) -> list[str]:
    """Everything of the release that still exists, namespaced and cluster-wide."""
    selector = f"app.kubernetes.io/instance={release}"
    kinds = "all,serviceaccounts,roles,rolebindings,secrets,configmaps,kopfpeerings"
    left = kube.kubectl("get", kinds, "-n", ns, "-l", selector, "-o", "name").stdout.split()
    cluster = "clusterroles,clusterrolebindings,clusterkopfpeerings"
    left += kube.kubectl("get", cluster, "-l", selector, "-o", "name").stdout.split()
    return left


def test_install_elects_one_leader_and_uninstall_leaves_nothing(
    local: Kube, crds: list[str], namespace: str
) -> None:
    """Two replicas watching only this namespace (so other tests' objects are not touched):
    both Ready, one paused in favour of the other through the KopfPeering, no Forbidden."""
    release = f"lp-{namespace}"[:53]
    # kopf's peering CRDs Established first: on a fresh cluster a CRD helm creates a moment
    # before the operators start answers their watches "storage is (re)initializing" for a while.
    peering_crds = chart.CHART / "charts" / "kopf-peering" / "crds"
    local.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(peering_crds))
    local.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/kopfpeerings.kopf.dev",
        "crd/clusterkopfpeerings.kopf.dev",
    )
    helm_bin = local.local.bins.helm
    base = [str(helm_bin), f"--kubeconfig={local.kubeconfig}", f"--namespace={namespace}"]
    install = subprocess.run(
        [
            *base,
            "install",
            release,
            str(chart.CHART),
            f"--values={chart.LOCAL_VALUES}",
            f"--set=watchNamespaces={{{namespace}}}",
            "--set=replicaCount=2",
            "--wait",
            "--timeout=120s",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert install.returncode == 0, install.stderr
    assert "kubectl apply --server-side -f charts/loraplane/crds/" in install.stdout  # NOTES
    selector = f"app.kubernetes.io/instance={release}"
    pods = local.get_json("pods", "-n", namespace, "-l", selector)["items"]
    assert len(pods) == 2 and all(is_ready(p) for p in pods), pods
    names = {p["metadata"]["name"] for p in pods}

    def peers() -> dict | None:
        (peering,) = local.get_json("kopfpeerings", "-n", namespace, "-l", selector)["items"]
        status = peering.get("status") or {}
        return status if set(status) == names else None

    status = wait_for(peers, 60, f"both operator pods {sorted(names)} in the KopfPeering")
    priorities = {p["priority"] for p in status.values()}
    assert len(priorities) == 2, status  # random per replica: never a tie that freezes both
    leader = max(status, key=lambda n: status[n]["priority"])
    (follower,) = names - {leader}

    def log(pod: str) -> str:
        return local.kubectl("logs", pod, "-n", namespace).stdout

    wait_for(
        lambda: "Pausing operations in favour of" in log(follower),
        120,
        f"{follower} (lower priority) to pause in favour of {leader}",
    )
    assert "Pausing operations" not in log(leader)
    for pod in names:
        assert "Forbidden" not in log(pod), log(pod)

    net = local.local.pod_network()
    if net is not None and net.routed:  # metrics on the pod's own address, from the host
        ip = next(p["status"]["podIP"] for p in pods if p["metadata"]["name"] == leader)
        assert ipaddress.IPv4Address(ip) in net.network
        with urllib.request.urlopen(f"http://{ip}:8080/metrics", timeout=5) as resp:
            assert resp.status == 200

    uninstall = subprocess.run(
        [*base, "uninstall", release, "--wait", "--timeout=60s"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert uninstall.returncode == 0, uninstall.stderr
    left: list[str] = []

    def all_gone() -> bool:
        left[:] = leftovers(local, namespace, release)
        return not left

    try:
        wait_for(all_gone, 60, f"nothing of release {release} left")
    except AssertionError as e:
        raise AssertionError(f"{e}; still there: {left}") from None
    # CRDs stay, by design: helm never deletes them, and other releases may use them.
    crd_names = json.loads(local.kubectl("get", "crd", "-o", "json").stdout)["items"]
    assert {"kopfpeerings.kopf.dev", *crds} <= {c["metadata"]["name"] for c in crd_names}
