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
                # Resolve against the file's own package, so a climb out of it is seen.
                parts = ["loraplane", *path.relative_to(SRC).parent.parts]
                anchor = parts[: len(parts) - (node.level - 1)]
                names = [".".join([*anchor, node.module] if node.module else anchor)]
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
        if name.split(".")[0] in heavy
        or name == "loraplane.runtime"
        or name.startswith("loraplane.runtime.")
    }
    assert not bad, f"operator imports the runtime side: {sorted(bad)}"


# The operator's logic: decisions on plain data, unit-tested without a cluster or a pod.
PURE_OPERATOR_MODULES = (
    "names",
    "config",
    "manifests",
    "adaptersync",
    "status",
    "pods",
    "rates",
    "autoscaler",
    "bodies",
    "routing",
    "demand",
)
SIDE_EFFECTS = {"kopf", "kubernetes", "httpx", "prometheus_client.exposition"}


def test_pure_operator_modules_touch_no_cluster_no_pod():
    bad = {
        (name, where)
        for name, where in imported_modules("operator")
        if Path(where).stem in PURE_OPERATOR_MODULES
        and Path(where).parent.name == "operator"
        and (name.split(".")[0] in SIDE_EFFECTS or name in SIDE_EFFECTS)
    }
    assert not bad, f"pure operator modules with side effects: {sorted(bad)}"


def test_only_handlers_and_main_import_kopf():
    bad = {
        (name, where)
        for name, where in imported_modules("operator")
        if name.split(".")[0] == "kopf"
        and not where.startswith("operator/handlers/")
        and where != "operator/__main__.py"
    }
    assert not bad, f"kopf outside handlers/: {sorted(bad)}"


def test_the_router_needs_only_its_extra():
    """Router pods run the runtime image with the `router` extra: nothing else may be imported
    (no torch, no kopf, no operator)."""
    import sys

    allowed = {
        "loraplane",
        "kubernetes",
        "starlette",
        "uvicorn",
        "httpx",
        "prometheus_client",
        "pydantic",
        "anyio",
    }
    bad = {
        (name, where)
        for name, where in imported_modules("router")
        if name.split(".")[0] not in allowed | set(sys.stdlib_module_names)
        or name.startswith(("loraplane.operator", "loraplane.runtime"))
    }
    assert not bad, f"router imports outside its extra: {sorted(bad)}"
