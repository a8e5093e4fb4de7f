"""docs/gitops.md: its manifests parse and name what the repository really has."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "gitops.md").read_text()


def yaml_blocks() -> list[dict]:
    docs = []
    for block in re.findall(r"```yaml\n(.*?)```", DOC, re.DOTALL):
        if block.startswith("  healthChecks:"):  # a fragment of the Kustomization's spec
            block = "spec:\n" + block
        docs += [d for d in yaml.safe_load_all(block) if d]
    return docs


def test_manifests_parse_and_cover_both_tools() -> None:
    kinds = {(d.get("apiVersion"), d.get("kind")) for d in yaml_blocks()}
    assert {
        ("argoproj.io/v1alpha1", "Application"),
        ("source.toolkit.fluxcd.io/v1", "GitRepository"),
        ("kustomize.toolkit.fluxcd.io/v1", "Kustomization"),
        ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    } <= kinds


def test_the_named_files_and_resources_exist() -> None:
    for path in re.findall(r"`(deploy/argocd/[\w.-]+|examples/[\w./-]+)`", DOC):
        assert (REPO / path).exists(), path
    for name in re.findall(r"`(health-[\w]+\.lua)`", DOC):
        assert (REPO / "deploy" / "argocd" / name).exists(), name
    checks = next(d for d in yaml_blocks() if "healthChecks" in d.get("spec", {}))
    kinds = {c["kind"] for c in checks["spec"]["healthChecks"]}
    assert kinds == {"BaseModelDeployment", "LoraAdapter"}
    for c in checks["spec"]["healthChecks"]:
        assert c["apiVersion"] == "loraplane.io/v1alpha1"
