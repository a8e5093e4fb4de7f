"""The runtime never imports the operator or kopf; the operator never imports torch."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "loraplane"


def imported_modules(package: str) -> set[tuple[str, str]]:
    found = set()
    for path in (SRC / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                # A relative import climbing out of the package could reach the other one.
                names = ["loraplane." + (node.module or "")] if node.level > 1 else []
            else:
                continue
            found.update((name, str(path.relative_to(SRC))) for name in names)
    return found


def test_runtime_never_imports_operator_or_kopf():
    bad = {
        (name, where)
        for name, where in imported_modules("runtime")
        if name.split(".")[0] == "kopf" or name.startswith("loraplane.operator")
    }
    assert not bad, f"runtime imports the operator side: {sorted(bad)}"


def test_operator_never_imports_torch():
    heavy = {"torch", "triton", "transformers", "peft", "loraplane.runtime"}
    bad = {
        (name, where)
        for name, where in imported_modules("operator")
        if name.split(".")[0] in heavy or name.startswith("loraplane.runtime")
    }
    assert not bad, f"operator imports the runtime side: {sorted(bad)}"
