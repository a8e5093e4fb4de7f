"""Every example is accepted by the real API server; every invalid one is rejected, saying why."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from e2e.cluster.paths import REPO
from e2e.cluster.testing import Kube

EXAMPLES = REPO / "examples"
VALID = sorted(
    p for p in EXAMPLES.rglob("*.yaml") if "invalid" not in p.relative_to(EXAMPLES).parts
)
INVALID = sorted((EXAMPLES / "invalid").glob("*.yaml"))


def header(path: Path, key: str) -> list[str]:
    """Values of `# key: value` lines in the comment block a manifest starts with."""
    found = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.match(rf"#\s*{key}:\s*(.+?)\s*$", line)
        if m:
            found.append(m.group(1))
    return found


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(EXAMPLES)) for p in paths]


def test_there_are_examples() -> None:
    assert VALID and INVALID, f"examples missing under {EXAMPLES}"


@pytest.mark.parametrize("path", VALID, ids=ids(VALID))
def test_valid_example_is_accepted(kube: Kube, crds: list[str], namespace: str, path: Path) -> None:
    proc = kube.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    assert proc.returncode == 0, f"{path.name} was rejected:\n{proc.stderr}"


@pytest.mark.parametrize("path", INVALID, ids=ids(INVALID))
def test_invalid_example_is_rejected_with_its_reason(
    kube: Kube, crds: list[str], namespace: str, path: Path
) -> None:
    expected = header(path, "expect")
    assert expected, f"{path} needs a `# expect: <substring of the error>` header line"
    proc = kube.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    assert proc.returncode != 0, (
        f"{path.name} was accepted; it should fail: {header(path, 'reason')}"
    )
    for substring in expected:
        assert substring in proc.stderr, f"{path.name}: expected {substring!r} in:\n{proc.stderr}"
