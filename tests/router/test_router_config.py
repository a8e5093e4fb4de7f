"""RouterConfig from the environment: the operator's variables, defaults, readable refusals."""

from __future__ import annotations

import pytest

from loraplane.api.wire import (
    ROUTER_BASE_ENV,
    ROUTER_NAMESPACE_ENV,
    ROUTER_POD_SELECTOR_ENV,
    ROUTER_PORT_ENV,
)
from loraplane.router.config import RouterConfig

REQUIRED = {
    ROUTER_NAMESPACE_ENV: "team-a",
    ROUTER_BASE_ENV: "tiny",
    ROUTER_POD_SELECTOR_ENV: "loraplane.io/base-model=tiny",
}


def test_required_variables_and_defaults() -> None:
    config = RouterConfig.from_env(REQUIRED)
    assert (config.namespace, config.base, config.port) == ("team-a", "tiny", 8000)
    assert config.metrics_port != config.port and config.api_keys_secret == ""
    tuned = RouterConfig.from_env(
        {**REQUIRED, ROUTER_PORT_ENV: "9000", "LORAPLANE_ROUTER_HOLD_TIMEOUT_SECONDS": "2.5"}
    )
    assert tuned.port == 9000 and tuned.hold_timeout_seconds == 2.5


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({ROUTER_BASE_ENV: ""}, "LORAPLANE_ROUTER_BASE is required"),
        ({ROUTER_PORT_ENV: "http"}, "LORAPLANE_ROUTER_PORT='http' is not a valid int"),
        ({ROUTER_PORT_ENV: "9090"}, "the metrics port must differ"),
        ({"LORAPLANE_ROUTER_MAX_HELD": "0"}, "LORAPLANE_ROUTER_MAX_HELD must be at least 1"),
        ({"LORAPLANE_ROUTER_HOLD_TIMEOUT_SECONDS": "0"}, "must be positive"),
    ],
)
def test_refusals_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RouterConfig.from_env({**REQUIRED, **env})
