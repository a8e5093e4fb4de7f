"""OperatorConfig from the environment: defaults, types, and errors that name the variable."""

from __future__ import annotations

import pytest

from loraplane.operator.config import OperatorConfig


def test_defaults_when_nothing_is_set() -> None:
    assert OperatorConfig.from_env({}) == OperatorConfig()


def test_every_kind_of_value_is_read() -> None:
    c = OperatorConfig.from_env(
        {
            "LORAPLANE_NAMESPACES": "a, b,,c",
            "LORAPLANE_SYNC_CONCURRENCY": "4",
            "LORAPLANE_RESYNC_SECONDS": "2.5",
            "LORAPLANE_RUNTIME_COMMAND": "python -m loraplane.runtime",
            "LORAPLANE_PEERING": "loraplane",
        }
    )
    assert c.namespaces == ("a", "b", "c") and c.sync_concurrency == 4
    assert c.resync_seconds == 2.5 and c.peering == "loraplane"
    assert c.runtime_command == ("python", "-m", "loraplane.runtime")


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"LORAPLANE_SYNC_CONCURRENCY": "many"}, "LORAPLANE_SYNC_CONCURRENCY='many'"),
        ({"LORAPLANE_SYNC_CONCURRENCY": "0"}, "LORAPLANE_SYNC_CONCURRENCY must be at least 1"),
        ({"LORAPLANE_METRICS_PORT": "70000"}, "LORAPLANE_METRICS_PORT"),
        ({"LORAPLANE_LOAD_TIMEOUT_SECONDS": "-1"}, "LORAPLANE_LOAD_TIMEOUT_SECONDS"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        OperatorConfig.from_env(env)
