"""The CRDs against a real API server: Established, printer columns, scale, immutability."""

from __future__ import annotations

import json

import yaml
from e2e.cluster.paths import REPO
from e2e.cluster.testing import Kube, wait_for

CRDS = REPO / "crds"

BMD = {
    "apiVersion": "loraplane.io/v1alpha1",
    "kind": "BaseModelDeployment",
    "metadata": {"name": "tiny"},
    "spec": {"model": {"source": "file:///models/tiny"}, "replicas": 1},
}


def lora(name: str, base: str) -> dict:
    return {
        "apiVersion": "loraplane.io/v1alpha1",
        "kind": "LoraAdapter",
        "metadata": {"name": name},
        "spec": {"baseModel": base, "source": f"file:///adapters/{name}"},
    }


def crd_file(kind: str) -> dict:
    for path in sorted(CRDS.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc["spec"]["names"]["kind"] == kind:
            return doc
    raise AssertionError(f"no CRD of kind {kind} in {CRDS}")


def apply(kube: Kube, ns: str, obj: dict, check: bool = True):
    return kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj), check=check)


def test_crds_are_established(kube: Kube, crds: list[str]) -> None:
    assert {"basemodeldeployments.loraplane.io", "loraadapters.loraplane.io"} <= set(crds)
    for name in crds:
        crd = kube.get_json("crd", name)
        conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conds.get("Established") == "True", (name, conds)
        assert conds.get("NamesAccepted") == "True", (name, conds)
    # Short names and the category resolve through discovery.
    kube.kubectl("get", "bmd,lora", "-A")
    kube.kubectl("get", "loraplane", "-A")


def test_printer_columns_show_in_kubectl_get_lora(
    kube: Kube, crds: list[str], namespace: str
) -> None:
    apply(kube, namespace, BMD)
    apply(kube, namespace, lora("sql", "tiny"))
    out = kube.kubectl("get", "lora", "-n", namespace).stdout.splitlines()
    version = crd_file("LoraAdapter")["spec"]["versions"][0]
    wanted = [
        c["name"].upper() for c in version["additionalPrinterColumns"] if not c.get("priority")
    ]
    header = out[0].split()
    assert header[0] == "NAME" and header[1:] == wanted, out
    row = out[1].split()
    assert row[0] == "sql" and row[1] == "tiny", out  # Base is the first column
    wide = kube.kubectl("get", "lora", "-n", namespace, "-o", "wide").stdout.splitlines()[0].split()
    assert len(wide) > len(header), "priority-1 columns appear with -o wide"


def test_scale_subresource_with_kubectl_scale(kube: Kube, crds: list[str], namespace: str) -> None:
    apply(kube, namespace, BMD)
    kube.kubectl("scale", "bmd", "tiny", "--replicas=3", "-n", namespace)
    assert kube.get_json("bmd", "tiny", "-n", namespace)["spec"]["replicas"] == 3
    scale = json.loads(
        kube.kubectl(
            "get",
            "--raw",
            f"/apis/loraplane.io/v1alpha1/namespaces/{namespace}/basemodeldeployments/tiny/scale",
        ).stdout
    )
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 3


def test_base_model_is_immutable(kube: Kube, crds: list[str], namespace: str) -> None:
    apply(kube, namespace, lora("sql", "tiny"))
    proc = apply(kube, namespace, lora("sql", "other"), check=False)
    assert proc.returncode != 0, "changing spec.baseModel must be rejected"
    assert "baseModel is immutable" in proc.stderr, proc.stderr
    assert kube.get_json("lora", "sql", "-n", namespace)["spec"]["baseModel"] == "tiny"


def test_status_is_a_subresource(kube: Kube, crds: list[str], namespace: str) -> None:
    """A user's apply cannot write status; the operator patches it through /status."""
    obj = dict(BMD, status={"replicas": 7})
    apply(kube, namespace, obj)
    got = kube.get_json("bmd", "tiny", "-n", namespace)
    assert got.get("status", {}).get("replicas") != 7
    kube.kubectl(
        "patch",
        "bmd",
        "tiny",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"replicas": 2}}),
    )
    wait_for(
        lambda: kube.get_json("bmd", "tiny", "-n", namespace)["status"]["replicas"] == 2,
        10,
        "status.replicas written through the status subresource",
    )
