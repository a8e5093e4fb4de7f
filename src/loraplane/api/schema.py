"""Pydantic JSON Schema to a Kubernetes structural schema: refs inlined, nulls and titles gone."""

import re
from typing import Any

from pydantic import BaseModel

INT32_MAX = 2**31 - 1
# Keys pydantic writes that a structural schema has no use for or forbids.
_DROPPED = {"title", "$defs"}


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The openAPIV3Schema of a model's fields, ready for a CRD."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _clean(raw, raw.get("$defs", {}), path=model.__name__)


def _clean(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    node = _resolve(node, defs, path)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "properties":
            out[key] = {name: _clean(sub, defs, f"{path}.{name}") for name, sub in value.items()}
        elif key == "items":
            out[key] = _clean(value, defs, f"{path}[]")
        elif key == "additionalProperties":
            if isinstance(value, dict):  # a map; `false` (extra="forbid") is not structural
                out[key] = _clean(value, defs, f"{path}{{}}")
        elif key == "default" and value is None:
            continue
        elif key == "description":
            out[key] = _reflow(value)
        elif key == "required":
            out[key] = sorted(value)
        else:
            out[key] = value
    if out.get("type") == "integer":
        out.setdefault("format", "int32" if out.get("maximum", 2**63) <= INT32_MAX else "int64")
    if "type" not in out:
        raise ValueError(f"{path}: no type in {node}: every node of a structural schema needs one")
    return out


def _resolve(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """Replace $ref and Optional's anyOf [X, null] by X, keeping the outer keys on top."""
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        return _merge(_resolve(target, defs, path), node)
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b != {"type": "null"}]
        if len(branches) != 1:
            raise ValueError(f"{path}: a union cannot be a structural schema: {branches}")
        return _merge(_resolve(branches[0], defs, path), node)
    return node


def _merge(inner: dict[str, Any], outer: dict[str, Any]) -> dict[str, Any]:
    merged = {**inner, **outer}
    rules = inner.get("x-kubernetes-validations", []) + outer.get("x-kubernetes-validations", [])
    if rules:
        merged["x-kubernetes-validations"] = rules
    return merged


def _reflow(text: str) -> str:
    """One line per paragraph: kubectl explain wraps text itself."""
    paragraphs = re.split(r"\n\s*\n", text.strip())
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)
