"""Certificates and service-account keys for the local control plane, made with openssl."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Leaf:
    name: str  # file stem: <name>.crt, <name>.key
    subject: str  # openssl form, e.g. /O=system:masters/CN=admin
    server: bool = False
    sans: tuple[str, ...] = ()


# Client certificates whose subjects match the built-in RBAC bindings, plus the operator's
# own user, bound only to the chart's ClusterRole (chart.py).
LEAVES = (
    Leaf(
        "apiserver",
        "/CN=kube-apiserver",
        server=True,
        sans=(
            "IP:127.0.0.1",
            "IP:10.96.0.1",
            "DNS:localhost",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
        ),
    ),
    Leaf("admin", "/O=system:masters/CN=admin"),
    Leaf("controller-manager", "/CN=system:kube-controller-manager"),
    Leaf("scheduler", "/CN=system:kube-scheduler"),
    Leaf("operator", "/CN=loraplane-operator"),
    # The node agent's kubelet API, which the apiserver calls for `kubectl logs`.
    Leaf(
        "nodeagent", "/CN=loraplane-nodeagent", server=True, sans=("IP:127.0.0.1", "DNS:localhost")
    ),
    # The apiserver's client certificate towards kubelets (our node agent never checks it).
    Leaf("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client"),
)


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


def ensure_pki(pki: Path) -> None:
    """Create whatever is missing; existing files are kept so restarts reuse them."""
    pki.mkdir(parents=True, exist_ok=True)
    if not (pki / "ca.crt").exists():
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "3650",
            "-subj",
            "/CN=loraplane-local-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            cwd=pki,
        )
    if not (pki / "sa.pub").exists():
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    for leaf in LEAVES:
        if (pki / f"{leaf.name}.crt").exists():
            continue
        ext = [
            "extendedKeyUsage=" + ("serverAuth" if leaf.server else "clientAuth"),
            "keyUsage=critical,digitalSignature,keyEncipherment",
        ]
        if leaf.sans:
            ext.append("subjectAltName=" + ",".join(leaf.sans))
        (pki / f"{leaf.name}.ext").write_text("\n".join(ext) + "\n")
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{leaf.name}.key",
            "-out",
            f"{leaf.name}.csr",
            "-subj",
            leaf.subject,
            cwd=pki,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{leaf.name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "365",
            "-out",
            f"{leaf.name}.crt",
            "-extfile",
            f"{leaf.name}.ext",
            cwd=pki,
        )
    for path in pki.glob("*.key"):
        path.chmod(0o600)
