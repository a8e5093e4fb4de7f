"""Fixtures of the API tests."""

from typing import Any

import pytest
from api_offline import crd_by_kind


@pytest.fixture(scope="session")
def crds() -> dict[str, dict[str, Any]]:
    """Generated CRD objects by kind."""
    return crd_by_kind()
