"""Where the control plane's binaries and state live; one place so shell and Python agree."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def versions() -> dict[str, str]:
    out = {}
    for line in (HERE / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def cache_root() -> Path:
    return Path(os.environ.get("LORAPLANE_CACHE") or Path.home() / ".cache" / "loraplane")


@dataclass(frozen=True)
class Bins:
    """Built binaries, in $LORAPLANE_CACHE/bin/<tool>-<version>/ (see build.sh)."""

    root: Path

    @classmethod
    def default(cls) -> Bins:
        return cls(cache_root() / "bin")

    def _dir(self, tool: str, key: str) -> Path:
        return self.root / f"{tool}-{versions()[key]}"

    @property
    def etcd(self) -> Path:
        return self._dir("etcd", "ETCD_VERSION") / "etcd"

    def k8s(self, name: str) -> Path:
        return self._dir("k8s", "K8S_VERSION") / name

    @property
    def kubectl(self) -> Path:
        return self.k8s("kubectl")

    @property
    def helm(self) -> Path:
        return self._dir("helm", "HELM_VERSION") / "helm"

    @property
    def kwok(self) -> Path:
        return self._dir("kwok", "KWOK_VERSION") / "kwok"

    @property
    def kwok_stages(self) -> Path:
        return self._dir("kwok", "KWOK_VERSION") / "stages.yaml"

    def missing(self) -> list[Path]:
        wanted = [self.etcd, self.kubectl, self.helm, self.kwok, self.kwok_stages]
        wanted += [
            self.k8s(n) for n in ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
        ]
        return [p for p in wanted if not p.exists()]


def state_dir() -> Path:
    """The running cluster's certs, etcd data, kubeconfigs, logs and pids (gitignored)."""
    return Path(os.environ.get("LORAPLANE_CLUSTER_DIR") or REPO / ".cache" / "cluster")
