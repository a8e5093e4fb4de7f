"""Offline judges of manifests: the generated CRD schemas (jsonschema) and the pydantic models."""

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from pydantic import ValidationError

from loraplane.api import BaseModelDeployment, LoraAdapter
from loraplane.api.crdgen import all_crds

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
MODELS = {"BaseModelDeployment": BaseModelDeployment, "LoraAdapter": LoraAdapter}


def crd_by_kind() -> dict[str, dict[str, Any]]:
    return {crd["spec"]["names"]["kind"]: crd for crd in all_crds().values()}


def open_api_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Unknown fields rejected, as kubectl's default strict field validation does on the server.

    The root's metadata stays open: the API server owns most of it.
    """
    out = copy.deepcopy(schema)

    def close(node: dict[str, Any]) -> None:
        if "properties" in node:
            node["additionalProperties"] = False
            for sub in node["properties"].values():
                close(sub)
        if isinstance(node.get("items"), dict):
            close(node["items"])
        if isinstance(node.get("additionalProperties"), dict):
            close(node["additionalProperties"])

    for name, sub in out["properties"].items():
        if name != "metadata":
            close(sub)
    return out


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".")


# Schema failures after which the API server skips the CEL rules (as kube-apiserver does).
BLOCKING = {"required", "enum", "type", "maxLength", "maxItems", "maxProperties"}


def schema_report(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(jsonschema keyword, `spec.field: message` phrased like the API server) per failure."""
    schema = strict(open_api_schema(crd_by_kind()[obj["kind"]]))
    report = []
    for error in jsonschema.Draft202012Validator(schema).iter_errors(obj):
        path = _path(error.absolute_path)
        missing = re.match(r"'(.+)' is a required property", error.message)
        if missing:
            text = f"{path}.{missing.group(1)}: Required value".lstrip(".")
        else:
            text = f"{path}: {error.message}"
        report.append((str(error.validator), text))
    return report


def schema_errors(obj: dict[str, Any]) -> list[str]:
    return [text for _, text in schema_report(obj)]


def model_errors(obj: dict[str, Any]) -> list[str]:
    """What the pydantic model says (it mirrors the CEL rules too): `spec.field: message`."""
    try:
        MODELS[obj["kind"]].model_validate(obj)
    except ValidationError as error:
        return [f"{_path(e['loc'])}: {e['msg']}" for e in error.errors()]
    return []


def load(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path}: one manifest per file, found {len(docs)}"
    return docs[0]
