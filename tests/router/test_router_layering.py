"""The router needs no torch and none of the runtime; its decisions touch no network or cluster."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# One import walker for the whole project: tests/test_layering.py's.
_spec = importlib.util.spec_from_file_location(
    "project_layering", Path(__file__).resolve().parents[1] / "test_layering.py"
)
assert _spec is not None and _spec.loader is not None
_layering = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_layering)
SRC, imported_modules = _layering.SRC, _layering.imported_modules

HEAVY = {"torch", "triton", "transformers", "peft", "kopf"}
PURE_ROUTER = ("config", "table", "choice", "retry", "holds", "keys", "errors")
PURE_OPERATOR = ("routing", "demand")
SIDE_EFFECTS = {
    "kubernetes",
    "httpx",
    "starlette",
    "uvicorn",
    "kopf",
    "prometheus_client.exposition",
}


def test_router_imports_neither_the_runtime_nor_the_operator() -> None:
    bad = {
        (name, where)
        for name, where in imported_modules("router")
        if name.split(".")[0] in HEAVY
        or name.startswith(("loraplane.runtime", "loraplane.operator"))
    }
    assert not bad, f"the router imports heavy or foreign code: {sorted(bad)}"


def test_routing_decisions_are_pure() -> None:
    bad = {
        (name, where)
        for package, pure in (("router", PURE_ROUTER), ("operator", PURE_OPERATOR))
        for name, where in imported_modules(package)
        if Path(where).stem in pure
        and Path(where).parent.name == package
        and (name.split(".")[0] in SIDE_EFFECTS or name in SIDE_EFFECTS)
    }
    assert not bad, f"pure modules with side effects: {sorted(bad)}"


def test_the_pure_modules_exist() -> None:
    for package, pure in (("router", PURE_ROUTER), ("operator", PURE_OPERATOR)):
        for stem in pure:
            assert (SRC / package / f"{stem}.py").exists(), stem


def test_the_router_process_loads_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, loraplane.router.__main__, loraplane.operator.routing; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'kopf') or m.startswith('loraplane.runtime')); "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
