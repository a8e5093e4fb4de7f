"""Tests against a real API server: one cluster per session, a namespace per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # e2e/ is tooling, not an installed package
    sys.path.insert(0, str(REPO))

from e2e.cluster.fixtures import *  # noqa: E402, F403


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.cluster)
