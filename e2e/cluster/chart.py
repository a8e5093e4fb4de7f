"""The loraplane chart on the local cluster: its ClusterRole for the local operator user, and
the operator installed by helm for `make up` / `make down`.

The chart's RBAC template is the one list of what the operator may do: the local user gets it
rendered, never a copy.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .paths import HERE, REPO, versions

if TYPE_CHECKING:
    from .controlplane import ControlPlane

CHART = REPO / "charts" / "loraplane"
RBAC_TEMPLATE = "templates/rbac.yaml"
OPERATOR_USER = "loraplane-operator"  # CN of the operator's client certificate (pki.py)
# Rendered as a release of this name, the chart's ClusterRole is called this too.
OPERATOR_ROLE = "loraplane-operator"
RELEASE = "loraplane"  # what `make up` installs
NAMESPACE = "loraplane-system"
LOCAL_VALUES = HERE / "values-local.yaml"
SELECTOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"
FIELD_MANAGER = "loraplane-cluster"


class ChartError(RuntimeError):
    pass


def helm(cp: ControlPlane, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the built helm against the local cluster as admin; a failure raises with its stderr."""
    argv = [str(cp.bins.helm), f"--kubeconfig={cp.kubeconfig()}", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ChartError(f"helm {' '.join(args)} failed:\n{proc.stderr.strip()}")
    return proc


def render(helm_bin: Path, release: str, *args: str) -> str:
    """`helm template` of the chart, offline (no cluster needed); YAML text."""
    # The cluster's version, whatever helm was built to assume (the chart asks for >= 1.30).
    kube_version = versions()["K8S_VERSION"]
    argv = [str(helm_bin), "template", release, str(CHART), f"--kube-version={kube_version}", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ChartError(f"helm template {release} {' '.join(args)} failed:\n{proc.stderr.strip()}")
    return proc.stdout


def operator_role(cp: ControlPlane) -> dict:
    """The chart's ClusterRole with default values, as JSON (kubectl converts, no YAML library)."""
    text = render(cp.bins.helm, OPERATOR_ROLE, "--show-only", RBAC_TEMPLATE)
    out = cp.kubectl("create", "--dry-run=client", "-o", "json", "-f", "-", input=text)
    roles = [o for o in _json_stream(out.stdout) if o["kind"] == "ClusterRole"]
    if len(roles) != 1:
        raise ChartError(f"{RBAC_TEMPLATE} rendered {len(roles)} ClusterRoles, expected 1")
    return roles[0]


def _json_stream(text: str) -> list[dict]:
    """kubectl prints one JSON document per object, one after the other."""
    decoder, pos, out = json.JSONDecoder(), 0, []
    text = text.strip()
    while pos < len(text):
        obj, pos = decoder.raw_decode(text, pos)
        out.append(obj)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def apply_operator_rbac(cp: ControlPlane) -> None:
    """Bind the local user loraplane-operator to the chart's ClusterRole (idempotent)."""
    role = operator_role(cp)
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": OPERATOR_USER, "labels": {"app.kubernetes.io/part-of": "loraplane"}},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": role["metadata"]["name"],
        },
        "subjects": [
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": OPERATOR_USER}
        ],
    }
    body = {"apiVersion": "v1", "kind": "List", "items": [role, binding]}
    cp.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        f"--field-manager={FIELD_MANAGER}",
        "-f",
        "-",
        input=json.dumps(body),
    )


def install_operator(cp: ControlPlane, timeout: float = 180) -> float:
    """`helm upgrade --install` the chart with local values and wait for the operator pod to be
    Ready; the CRDs are applied first, as an upgrade must (helm never upgrades them). Returns
    the seconds it took."""
    started = time.monotonic()
    cp.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        f"--field-manager={FIELD_MANAGER}",
        "-f",
        str(CHART / "crds"),
        "-f",
        str(CHART / "charts" / "kopf-peering" / "crds"),
    )
    helm(
        cp,
        "upgrade",
        "--install",
        RELEASE,
        str(CHART),
        f"--namespace={NAMESPACE}",
        "--create-namespace",
        f"--values={LOCAL_VALUES}",
        "--wait",
        f"--timeout={int(timeout)}s",
        timeout=timeout + 30,
    )
    return time.monotonic() - started


def uninstall_operator(cp: ControlPlane, timeout: float = 120) -> bool:
    """`helm uninstall --wait`; False when it was not installed."""
    listed = helm(cp, "list", f"--namespace={NAMESPACE}", "-q", f"--filter=^{RELEASE}$")
    if not listed.stdout.strip():
        return False
    helm(
        cp,
        "uninstall",
        RELEASE,
        f"--namespace={NAMESPACE}",
        "--wait",
        f"--timeout={int(timeout)}s",
        timeout=timeout + 30,
    )
    return True
