"""Our typed core/v1 mirrors use upstream's field names, types and required fields.

They are copied into the runtime pods' spec as they are, so a misspelt or mistyped field
would only show up when the operator creates the Deployment.
"""

import json
from importlib import resources
from typing import Any

import kubernetes_validate
import pytest
from pydantic import BaseModel

from loraplane.api import scheduling
from loraplane.api.container import EnvVar, EnvVarSource, FieldSelector, KeySelector
from loraplane.api.schema import structural_schema

CORE, META = "io.k8s.api.core.v1.", "io.k8s.apimachinery.pkg.apis.meta.v1."
MIRRORS: dict[type[BaseModel], str] = {
    scheduling.Toleration: CORE + "Toleration",
    scheduling.Affinity: CORE + "Affinity",
    scheduling.NodeAffinity: CORE + "NodeAffinity",
    scheduling.NodeSelector: CORE + "NodeSelector",
    scheduling.NodeSelectorTerm: CORE + "NodeSelectorTerm",
    scheduling.NodeSelectorRequirement: CORE + "NodeSelectorRequirement",
    scheduling.PreferredSchedulingTerm: CORE + "PreferredSchedulingTerm",
    scheduling.PodAffinity: CORE + "PodAffinity",
    scheduling.PodAntiAffinity: CORE + "PodAntiAffinity",
    scheduling.PodAffinityTerm: CORE + "PodAffinityTerm",
    scheduling.WeightedPodAffinityTerm: CORE + "WeightedPodAffinityTerm",
    scheduling.LabelSelector: META + "LabelSelector",
    scheduling.LabelSelectorRequirement: META + "LabelSelectorRequirement",
    EnvVar: CORE + "EnvVar",
    EnvVarSource: CORE + "EnvVarSource",
    KeySelector: CORE + "SecretKeySelector",
    FieldSelector: CORE + "ObjectFieldSelector",
}


@pytest.fixture(scope="module")
def upstream() -> dict[str, Any]:
    version = kubernetes_validate.latest_version()
    root = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    path = root / f"v{version}-local-strict" / "_definitions.json"
    return json.loads(path.read_text())["$defs"]


def upstream_type(node: dict[str, Any]) -> set[str]:
    if "$ref" in node:
        return {"object"}
    types = node.get("type", [])
    return set([types] if isinstance(types, str) else types) - {"null"}


@pytest.mark.parametrize("model", list(MIRRORS), ids=lambda m: m.__name__)
def test_mirror_matches_upstream(model, upstream):
    theirs = upstream[MIRRORS[model]]
    ours = structural_schema(model)
    unknown = set(ours["properties"]) - set(theirs["properties"])
    assert not unknown, f"{model.__name__}: not in {MIRRORS[model]}: {unknown}"
    for name, node in ours["properties"].items():
        assert node["type"] in upstream_type(theirs["properties"][name]), (model.__name__, name)
    assert set(theirs.get("required", [])) <= set(ours.get("required", [])), model.__name__


def test_key_selector_also_fits_config_maps(upstream):
    config_map = upstream[CORE + "ConfigMapKeySelector"]["properties"]
    assert set(structural_schema(KeySelector)["properties"]) <= set(config_map)
