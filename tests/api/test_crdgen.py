"""The CRD objects are valid, match what is committed, and --check catches drift."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from api_offline import REPO

from loraplane.api import BASE_MODEL_DEPLOYMENT, CATEGORY, LORA_ADAPTER
from loraplane.api.crdgen import all_crds, main, rendered

TARGETS = [REPO / "crds", REPO / "charts" / "loraplane" / "crds"]


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
@pytest.mark.parametrize("name", sorted(all_crds()))
def test_crd_objects_pass_kubernetes_validate(name, version):
    kubernetes_validate.validate(all_crds()[name], version, strict=True)


def test_names_short_names_and_category(crds):
    for names in (BASE_MODEL_DEPLOYMENT, LORA_ADAPTER):
        spec = crds[names.kind]["spec"]
        assert crds[names.kind]["metadata"]["name"] == f"{names.plural}.loraplane.io"
        assert spec["names"]["shortNames"] == list(names.short_names)
        assert spec["names"]["categories"] == [CATEGORY]
        assert spec["scope"] == "Namespaced"
        assert spec["versions"][0]["subresources"]["status"] == {}
    assert BASE_MODEL_DEPLOYMENT.short_names == ("bmd",)
    assert LORA_ADAPTER.short_names == ("lora",)


def test_adapter_columns_answer_the_first_questions(crds):
    columns = crds["LoraAdapter"]["spec"]["versions"][0]["additionalPrinterColumns"]
    shown = [c["name"] for c in columns if not c.get("priority")]
    assert shown == ["Base", "Source", "Loaded", "Ready", "Age"]


@pytest.mark.parametrize("target", TARGETS, ids=lambda p: str(p.relative_to(REPO)))
def test_committed_crds_are_up_to_date(target):
    for name, text in rendered().items():
        assert (target / name).read_text() == text, f"{target / name}: run `make crds`"


def test_output_is_deterministic_yaml():
    first, second = rendered(), rendered()
    assert first == second
    for text in first.values():
        assert yaml.safe_load(text)["kind"] == "CustomResourceDefinition"


def check(out: Path, chart: Path) -> int:
    return main(["--out", str(out), "--chart", str(chart), "--check"])


def test_check_passes_after_generate_and_names_a_drifting_file(tmp_path, capsys):
    out, chart = tmp_path / "crds", tmp_path / "chart"
    assert main(["--out", str(out), "--chart", str(chart)]) == 0
    assert check(out, chart) == 0

    drifted = chart / "loraplane.io_loraadapters.yaml"
    drifted.write_text(drifted.read_text().replace("maxLength: 52", "maxLength: 53"))
    assert check(out, chart) == 1
    err = capsys.readouterr().err
    assert str(drifted) in err and "make crds" in err
    assert str(out / "loraplane.io_loraadapters.yaml") not in err


def test_check_reports_missing_and_stale_files(tmp_path, capsys):
    out, chart = tmp_path / "crds", tmp_path / "chart"
    main(["--out", str(out), "--chart", str(chart)])
    (out / "loraplane.io_basemodeldeployments.yaml").unlink()
    (chart / "loraplane.io_oldthings.yaml").write_text("old")
    assert check(out, chart) == 1
    err = capsys.readouterr().err
    assert "loraplane.io_basemodeldeployments.yaml: missing" in err
    assert "loraplane.io_oldthings.yaml: no longer generated" in err
    main(["--out", str(out), "--chart", str(chart)])  # generating removes the stale file
    assert check(out, chart) == 0


def test_every_integer_bound_survives_the_api_servers_float64() -> None:
    """A maximum above 2**53 is rounded by the API server (2**63 - 1 became -2**63 and refused
    every status write)."""
    from loraplane.api.crdgen import all_crds

    def walk(node):
        if isinstance(node, dict):
            for key in ("maximum", "minimum"):
                if key in node:
                    assert abs(node[key]) <= 2**53 - 1, node
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for crd in all_crds().values():
        walk(crd)
