"""Valid examples pass the generated schemas and the models; each invalid one fails for its reason."""

import re
from pathlib import Path

import pytest
from api_offline import (
    BLOCKING,
    EXAMPLES,
    MODELS,
    crd_by_kind,
    load,
    model_errors,
    schema_errors,
    schema_report,
)

VALID = sorted(p for p in EXAMPLES.rglob("*.yaml") if "invalid" not in p.parts)
INVALID = sorted((EXAMPLES / "invalid").glob("*.yaml"))


def header(path: Path, key: str) -> str:
    found = re.search(rf"^# {key}: (.+)$", path.read_text(), re.MULTILINE)
    assert found, f"{path.name}: starts with a `# {key}: ...` line"
    return found.group(1).strip()


def cel_messages() -> set[str]:
    found: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            found.update(rule["message"] for rule in node.get("x-kubernetes-validations", []))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(crd_by_kind())
    return found


def test_there_are_examples_of_both_kinds():
    kinds = {load(p)["kind"] for p in VALID}
    assert kinds == set(MODELS)
    assert len(INVALID) >= 8


@pytest.mark.parametrize("path", VALID, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_valid_example_passes_schema_and_model(path):
    obj = load(path)
    assert schema_errors(obj) == []
    assert model_errors(obj) == []
    # What the models write back is accepted too (the operator parses and re-serializes).
    again = MODELS[obj["kind"]].model_validate(obj).to_dict()
    assert schema_errors(again) == []
    assert model_errors(again) == []


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_example_is_rejected_for_its_reason(path):
    header(path, "reason")
    expect = header(path, "expect")
    obj = load(path)
    from_schema, from_model = schema_report(obj), model_errors(obj)
    assert from_model, f"{path.name}: the models accept it"
    assert any(expect in e for e in from_model), f"{path.name}: {expect!r} not in {from_model}"
    if any(expect in text for _, text in from_schema):
        return
    # Otherwise only a CEL rule says it on the server: the text must be that rule's message, and
    # no schema failure may be of a kind that makes the server skip the CEL rules.
    assert any(expect in m for m in cel_messages()), f"{path.name}: {expect!r} not in {from_schema}"
    blocking = [text for keyword, text in from_schema if keyword in BLOCKING]
    assert not blocking, f"{path.name}: the server would not run CEL rules after {blocking}"


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_example_has_a_single_fault(path):
    """Anything else wrong would muddy the reason (and could stop the server's CEL rules)."""
    obj = load(path)
    assert len(model_errors(obj)) == 1, model_errors(obj)
