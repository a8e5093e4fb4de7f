"""The Dockerfiles (which cannot be built here: no Docker engine) start the console scripts the
node agent runs locally, as UID 65532, with the right extras; the images `make images` tags are
the ones the chart runs by default, and those follow the chart's appVersion."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from e2e.cluster import chart

from loraplane.api import BaseModelDeployment, LoraAdapter
from loraplane.testing.tiny import DEMO_ADAPTERS

REPO = chart.REPO
IMAGES = REPO / "images"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
CHART_META = yaml.safe_load((chart.CHART / "Chart.yaml").read_text())
APP_VERSION = CHART_META["appVersion"]
NONROOT = "65532:65532"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        word, _, args = (pending + line).strip().partition(" ")
        out.append((word.upper(), " ".join(args.split())))
        pending = ""
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


DOCKERFILES = {
    "operator": ("loraplane-operator", "operator"),
    "runtime": ("loraplane-runtime", "runtime"),
    "runtime-tiny": ("loraplane-runtime", None),
}


@pytest.mark.parametrize("image,expected", DOCKERFILES.items(), ids=DOCKERFILES.keys())
def test_entrypoint_is_a_console_script_run_as_nonroot(image: str, expected: tuple) -> None:
    script, _ = expected
    stage = final_stage(IMAGES / f"{image}.Dockerfile")
    entrypoints = [json.loads(args) for word, args in stage if word == "ENTRYPOINT"]
    assert entrypoints == [[script]], entrypoints  # exec form: the script is PID 1
    assert script in SCRIPTS
    users = [args for word, args in stage if word == "USER"]
    assert users and users[-1] == NONROOT, users


@pytest.mark.parametrize("image", ["operator", "runtime"])
def test_each_image_installs_its_own_extra(image: str) -> None:
    steps = instructions(IMAGES / f"{image}.Dockerfile")
    installs = [args for word, args in steps if word == "RUN" and "pip install" in args]
    assert len(installs) == 1
    listed = re.search(r"\.\[([a-z,]+)\]", installs[0])
    assert listed, installs[0]
    extras = set(listed.group(1).split(","))
    assert extras <= set(PYPROJECT["project"]["optional-dependencies"]), extras
    # The runtime's image also runs each base's router (routing.py uses the runtime image).
    assert extras == ({"runtime", "router"} if image == "runtime" else {image}), installs[0]
    bases = {args.split()[0] for word, args in steps if word == "FROM"}
    args = dict(a.partition("=")[::2] for w, a in steps if w == "ARG")
    (base,) = bases
    base_image = args[base.strip("${}")]
    if image == "runtime":
        assert base_image.startswith("nvidia/cuda:") and "-runtime-" in base_image
    else:  # small: a slim Python, and no torch anywhere in what it installs
        assert base_image.startswith("python:3.11-slim")
        deps = PYPROJECT["project"]["dependencies"]
        deps += PYPROJECT["project"]["optional-dependencies"]["operator"]
        assert not [d for d in deps if d.split("=")[0] in ("torch", "triton", "transformers")]


def test_make_images_tags_what_the_chart_runs_by_default(helm_bin: Path) -> None:
    assert PYPROJECT["project"]["version"] == APP_VERSION  # appVersion is the package's version
    out = subprocess.run(
        ["make", "-s", "-n", "images"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    built = {
        line.split(" -t ")[1].split()[0]: line.split(" -f ")[1].split()[0]
        for line in out.stdout.splitlines()
        if " build " in line
    }
    docs = [d for d in yaml.safe_load_all(chart.render(helm_bin, "lp")) if d]
    (container,) = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    operator, runtime = container["image"], env["LORAPLANE_RUNTIME_IMAGE"]
    assert operator == f"ghcr.io/loraplane/operator:{APP_VERSION}"
    assert runtime == f"ghcr.io/loraplane/runtime:{APP_VERSION}"
    assert built == {
        operator: "images/operator.Dockerfile",
        runtime: "images/runtime.Dockerfile",
    }
    # The chart's commands are the images' entrypoints.
    assert container["command"] == ["loraplane-operator"]
    assert env["LORAPLANE_RUNTIME_COMMAND"] == "loraplane-runtime"


def crd_schema(kind: str) -> dict:
    for path in (chart.CHART / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            (version,) = crd["spec"]["versions"]
            return version["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no CRD of kind {kind}")


def test_kind_example_serves_what_the_tiny_image_holds() -> None:
    """e2e/kind/tiny.yaml: valid resources whose sources are the files runtime-tiny builds."""
    docs = list(yaml.safe_load_all((REPO / "e2e" / "kind" / "tiny.yaml").read_text()))
    models = {"BaseModelDeployment": BaseModelDeployment, "LoraAdapter": LoraAdapter}
    for doc in docs:
        jsonschema.validate(doc, crd_schema(doc["kind"]))
        models[doc["kind"]].model_validate(doc)
    (base,) = [d for d in docs if d["kind"] == "BaseModelDeployment"]
    adapters = [d for d in docs if d["kind"] == "LoraAdapter"]
    assert base["spec"]["runtime"]["resources"]["gpus"] == 0  # any kind node can run it
    build = next(a for w, a in instructions(IMAGES / "runtime-tiny.Dockerfile") if w == "RUN")
    assert "build_demo('/models/tiny')" in build
    module = re.search(r"from (\S+) import build_demo", build)
    assert module and callable(importlib.import_module(module.group(1)).build_demo), build
    assert base["spec"]["model"]["source"] == "file:///models/tiny/base"
    assert {a["spec"]["source"] for a in adapters} == {
        f"file:///models/tiny/adapters/{name}" for name in DEMO_ADAPTERS
    }
    assert {a["spec"]["baseModel"] for a in adapters} == {base["metadata"]["name"]}
    ranks = [spec.r for spec in DEMO_ADAPTERS.values()]
    assert max(ranks) <= base["spec"]["maxLoraRank"]
