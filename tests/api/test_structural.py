"""The generated schemas are structural, bounded, and their defaults and rules are well formed."""

import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from api_offline import open_api_schema

KINDS = ["BaseModelDeployment", "LoraAdapter"]
FORBIDDEN = {"$ref", "anyOf", "oneOf", "allOf", "not", "title", "nullable", "$defs"}


def nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path or ".", schema
    for name, sub in schema.get("properties", {}).items():
        yield from nodes(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from nodes(schema["additionalProperties"], f"{path}{{}}")


def spec_and_status(crds: dict[str, Any], kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
    root = open_api_schema(crds[kind])
    for part in ("spec", "status"):
        yield from nodes(root["properties"][part], f".{part}")


@pytest.mark.parametrize("kind", KINDS)
def test_every_node_is_typed_and_structural(crds, kind):
    for path, node in nodes(open_api_schema(crds[kind])):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path}: untyped"
        assert not FORBIDDEN & node.keys(), f"{path}: {FORBIDDEN & node.keys()}"
        assert "x-kubernetes-preserve-unknown-fields" not in node, f"{path}: preserve-unknown"
        assert node.get("additionalProperties") is not False, f"{path}: additionalProperties false"
        assert not ("properties" in node and "additionalProperties" in node), path
        if node.get("type") == "object" and path != ".metadata":
            assert "properties" in node or "additionalProperties" in node, f"{path}: open object"


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_is_documented(crds, kind):
    for path, node in spec_and_status(crds, kind):
        if not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path}: no description"


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_is_bounded(crds, kind):
    """Bounds keep objects small and let the API server estimate the cost of CEL rules."""
    for path, node in spec_and_status(crds, kind):
        kind_ = node["type"]
        if kind_ == "string":
            assert "maxLength" in node or "enum" in node or node.get("format") == "date-time", path
        elif kind_ == "integer":
            assert "minimum" in node and "maximum" in node, path
            assert node["format"] in ("int32", "int64"), path
        elif kind_ == "array":
            assert "maxItems" in node, path
        elif kind_ == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, path
        assert kind_ != "number", f"{path}: no floats in the API"


@pytest.mark.parametrize("kind", KINDS)
def test_only_metadata_name_is_restricted(crds, kind):
    metadata = open_api_schema(crds[kind])["properties"]["metadata"]
    assert set(metadata["properties"]) == {"name"}


@pytest.mark.parametrize("kind", KINDS)
def test_defaults_are_valid_for_their_field(crds, kind):
    for _, node in spec_and_status(crds, kind):
        if "default" in node:
            bare = {k: v for k, v in node.items() if k != "default"}
            jsonschema.Draft202012Validator(bare).validate(node["default"])


@pytest.mark.parametrize("kind", KINDS)
def test_list_map_keys_are_required(crds, kind):
    for path, node in spec_and_status(crds, kind):
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            assert set(keys) <= set(node["items"].get("required", [])), path


@pytest.mark.parametrize("kind", KINDS)
def test_rules_have_messages_and_point_at_real_fields(crds, kind):
    for path, node in nodes(open_api_schema(crds[kind])):
        for rule in node.get("x-kubernetes-validations", []):
            assert rule["message"] and rule["rule"], path
            if "fieldPath" in rule:
                assert rule["fieldPath"].lstrip(".") in node["properties"], (path, rule)


def test_base_model_of_an_adapter_is_immutable(crds):
    spec = open_api_schema(crds["LoraAdapter"])["properties"]["spec"]
    rules = spec["properties"]["baseModel"]["x-kubernetes-validations"]
    assert {"rule": "self == oldSelf", "message": rules[0]["message"]} == rules[0]
    assert "immutable" in rules[0]["message"]


def test_scale_subresource_paths_exist(crds):
    version = crds["BaseModelDeployment"]["spec"]["versions"][0]
    scale = version["subresources"]["scale"]
    root = open_api_schema(crds["BaseModelDeployment"])
    for key in ("specReplicasPath", "statusReplicasPath", "labelSelectorPath"):
        part, field = scale[key].lstrip(".").split(".")
        assert field in root["properties"][part]["properties"], key
    assert root["properties"]["spec"]["properties"]["replicas"]["type"] == "integer"
    assert root["properties"]["status"]["properties"]["selector"]["type"] == "string"


def field_at(root: dict[str, Any], json_path: str) -> dict[str, Any]:
    node = root
    for part in re.sub(r"\[\?\(.*?\)\]", "[]", json_path).lstrip(".").split("."):
        node = node["properties"][part.removesuffix("[]")]
        if part.endswith("[]"):
            node = node["items"]
    return node


@pytest.mark.parametrize("kind", KINDS)
def test_printer_columns_read_existing_fields_of_their_type(crds, kind):
    root = open_api_schema(crds[kind])
    for column in crds[kind]["spec"]["versions"][0]["additionalPrinterColumns"]:
        if column["jsonPath"].startswith(".metadata."):
            continue
        assert field_at(root, column["jsonPath"])["type"] == column["type"], column


@pytest.mark.parametrize("kind", KINDS)
def test_conventions_enums_camel_case_durations_in_seconds(crds, kind):
    for path, node in spec_and_status(crds, kind):
        for value in node.get("enum", []):
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]*", value), f"{path}: {value!r}"
        name = path.rsplit(".", 1)[-1]
        if re.search(r"(Window|Stabilization|Idle|Timeout|Delay|Period)", name):
            assert name.endswith("Seconds") and node["type"] == "integer", path
