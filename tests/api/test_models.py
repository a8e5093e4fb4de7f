"""The models parse real objects and enforce what the CRD's schema and CEL rules enforce."""

import re
from typing import Any

import jsonschema
import pytest
from api_offline import crd_by_kind, model_errors, open_api_schema, schema_errors

from loraplane.api import (
    API_VERSION,
    BASE_MODEL_DEPLOYMENT,
    LORA_ADAPTER,
    AdapterState,
    AutoscalingSpec,
    BaseModelDeployment,
    BaseModelDeploymentSpec,
    ConditionStatus,
    LoraAdapter,
)


def open_api_schema_for(kind: str) -> dict[str, Any]:
    return open_api_schema(crd_by_kind()[kind])


def bmd(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "BaseModelDeployment",
        "metadata": {"name": "base"},
        "spec": {"model": {"source": "hf://org/model"}, **spec},
    }


def lora(name: str = "adapter", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "LoraAdapter",
        "metadata": {"name": name},
        "spec": {"baseModel": "base", "source": "hf://org/adapter", **spec},
    }


def autoscaling(**fields: Any) -> dict[str, Any]:
    return {"enabled": True, "maxReplicas": 4, "targetRequestsPerSecond": "5", **fields}


def test_literals_match_the_group_version_constants():
    fields = BaseModelDeployment.model_fields
    assert fields["api_version"].default == API_VERSION
    assert fields["kind"].default == BASE_MODEL_DEPLOYMENT.kind
    assert LoraAdapter.model_fields["kind"].default == LORA_ADAPTER.kind


def test_parses_an_object_as_the_api_server_returns_it():
    obj = lora(servedName="support")
    obj["metadata"].update(
        namespace="team-a",
        uid="6f1c",
        generation=2,
        resourceVersion="991",
        creationTimestamp="2026-11-28T16:00:00Z",
        managedFields=[{"manager": "kubectl", "operation": "Apply"}],
    )
    obj["status"] = {
        "observedGeneration": 2,
        "servedName": "support",
        "rank": 8,
        "targetModules": ["q_proj", "v_proj"],
        "replicas": [
            {"pod": "base-7d9-abcde", "state": "Loaded", "loadedAt": "2026-11-28T16:01:00Z"},
            {"pod": "base-7d9-fghij", "state": "Failed", "message": "download timed out"},
        ],
        "loadedReplicas": 1,
        "totalReplicas": 2,
        "loaded": "1/2",
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": "PartiallyLoaded",
                "message": "1 of 2 replicas",
                "lastTransitionTime": "2026-11-28T16:01:00Z",
                "observedGeneration": 2,
            }
        ],
    }
    adapter = LoraAdapter.model_validate(obj)
    assert adapter.metadata.namespace == "team-a"
    assert adapter.metadata.model_extra == {
        "creationTimestamp": "2026-11-28T16:00:00Z",
        "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
    }
    assert adapter.status is not None and adapter.status.replicas is not None
    assert adapter.status.replicas[0].state is AdapterState.LOADED
    assert adapter.status.conditions is not None
    assert adapter.status.conditions[0].status is ConditionStatus.FALSE
    assert schema_errors(adapter.to_dict()) == []


def test_served_name_defaults_to_the_object_name():
    assert LoraAdapter.model_validate(lora("magicoder")).served_name == "magicoder"
    named = LoraAdapter.model_validate(lora("magicoder", servedName="Magicoder-v2"))
    assert named.served_name == "Magicoder-v2"
    assert "servedName" not in LoraAdapter.model_validate(lora()).to_dict()["spec"]


def test_defaults_fill_a_minimal_spec_and_match_the_schema():
    spec = BaseModelDeploymentSpec.model_validate({"model": {"source": "hf://org/model"}})
    assert (spec.runtime.port, spec.runtime.resources.gpus) == (8000, 1)
    assert (spec.max_adapters, spec.max_lora_rank, spec.replicas) == (8, 64, 1)
    assert spec.autoscaling is None and spec.model.dtype == "BFloat16"
    schema = open_api_schema_for("BaseModelDeployment")["properties"]["spec"]["properties"]
    assert schema["maxAdapters"]["default"] == spec.max_adapters
    assert schema["runtime"]["default"] == {}


def test_python_names_work_too():
    scaling = AutoscalingSpec(min_replicas=0, max_replicas=2, target_requests_per_second="500m")
    assert scaling.to_dict()["minReplicas"] == 0
    assert scaling.to_dict()["scaleToZeroIdleSeconds"] == 900


# Each row: a manifest and a text both the models and kube-apiserver put in the rejection
# (checked against a real kube-apiserver 1.34 by hand; the cluster tests repeat it).
REJECTED = [
    (bmd(autoscaling=autoscaling(minReplicas=5)), "minReplicas must be less than or equal"),
    (
        bmd(autoscaling=autoscaling(panicWindowSeconds=120, stableWindowSeconds=60)),
        "panicWindowSeconds must be less than or equal",
    ),
    (bmd(model={"source": "s3://bucket/m", "revision": "main"}), "only supported for hf://"),
    (
        bmd(runtime={"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}),
        "Duplicate value",
    ),
    (bmd(runtime={"env": [{"name": "A", "valueFrom": {}}]}), "exactly one of secretKeyRef"),
    (
        bmd(scheduling={"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}),
        "operator Exists must not set value",
    ),
    (bmd(replicas=1.5), "spec.replicas"),
    (bmd(maxBatchTokens=10**9), "spec.maxBatchTokens"),
    (bmd(maxRunningSequences=512, maxBatchTokens=256), "maxRunningSequences must be less than"),
    (bmd(maxRunningSequences=0), "spec.maxRunningSequences"),
    (bmd(maxModelLen=8), "spec.maxModelLen"),
    (bmd(gpuMemoryUtilizationPercent=101), "spec.gpuMemoryUtilizationPercent"),
    (lora(source="pvc://claim/a", secretRef={"name": "creds"}), "secretRef is only used by"),
    (lora(source="hf://org/a", unknownField=1), "spec.unknownField"),
    (lora("x" * 64), "metadata.name"),
    (lora("magic.coder"), "metadata.name"),
]


@pytest.mark.parametrize(("obj", "expect"), REJECTED, ids=lambda v: str(v)[:40])
def test_models_reject(obj, expect):
    errors = model_errors(obj)
    assert any(expect in e for e in errors), errors


def test_base_name_leaves_room_for_child_names():
    assert model_errors({**bmd(), "metadata": {"name": "a" * 52}}) == []
    (error,) = model_errors({**bmd(), "metadata": {"name": "a" * 53}})
    assert "at most 52 characters" in error
    assert schema_errors({**bmd(), "metadata": {"name": "a" * 53}})


MODEL_SOURCES = {
    "hf://mistralai/Mistral-7B-v0.1": True,
    "hf://gpt2": True,
    "s3://my-bucket/models/mistral": True,
    "s3://my-bucket": True,
    "pvc://model-cache/mistral-7b": True,
    "file:///models/mistral": True,
    "hf://org/name/extra": False,
    "hf://": False,
    "s3://A_Bucket/x": False,
    "pvc://Claim/x": False,
    "file://relative/path": False,
    "file:///with space": False,
    "https://example.com/model": False,
    "gs://bucket/model": False,
}
RATES = {
    "10": True,
    "2.5": True,
    "0.25": True,
    ".5": True,
    "0.001": True,
    "2500m": True,
    "0": False,
    "0.0": False,
    "0m": False,
    "0.0001": False,
    "-1": False,
    "1e3": False,
    "1.5k": False,
}


@pytest.mark.parametrize(("source", "ok"), MODEL_SOURCES.items())
def test_model_sources_agree_offline_and_in_the_schema(source, ok):
    obj = bmd(model={"source": source})
    assert (model_errors(obj) == []) is ok
    assert (schema_errors(obj) == []) is ok


@pytest.mark.parametrize("source", ["https://example.com/a", "hf://predibase/magicoder"])
def test_adapter_sources_include_https(source):
    assert model_errors(lora(source=source)) == []
    assert schema_errors(lora(source=source)) == []


@pytest.mark.parametrize(("rate", "ok"), RATES.items())
def test_target_rates_agree_offline_and_in_the_schema(rate, ok):
    obj = bmd(autoscaling=autoscaling(targetRequestsPerSecond=rate))
    assert (model_errors(obj) == []) is ok
    assert (schema_errors(obj) == []) is ok


def test_patterns_are_re2_compatible():
    """The API server compiles patterns with Go's RE2: no lookaround or backreferences."""
    text = str(open_api_schema_for("BaseModelDeployment")) + str(open_api_schema_for("LoraAdapter"))
    for pattern in re.findall(r"'pattern': '((?:[^'\\]|\\.)*)'", text):
        assert not re.search(r"\(\?[=!<]|\\[1-9]", pattern), pattern


def test_generated_schemas_are_valid_json_schemas():
    for kind in ("BaseModelDeployment", "LoraAdapter"):
        jsonschema.Draft202012Validator.check_schema(open_api_schema_for(kind))
