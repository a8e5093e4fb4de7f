"""The operator-runtime contract is one set of facts: each side agrees with loraplane.api.wire."""

from __future__ import annotations

import random
import re

import pytest
from pydantic import ValidationError

from loraplane.api import Dtype, LoraAdapter, LoraAdapterSpec
from loraplane.api.crdgen import all_crds
from loraplane.api.wire import (
    ADAPTER_NAME,
    CREDENTIAL_KEYS,
    REPLICA_STATE,
    RUNTIME_DTYPE,
    SERVED_NAME_MAX,
    RuntimeAdapterState,
    adapter_name_problem,
    credential_keys_for,
)
from loraplane.runtime.adapters.errors import InvalidName
from loraplane.runtime.adapters.names import check_name
from loraplane.runtime.model.loader import TORCH_DTYPES

EDGE = "abcxyzABCXYZ0189"
INNER = EDGE + "-._"


def valid_names(count: int, seed: int) -> list[str]:
    """Names drawn over the whole grammar: every length class, every allowed character."""
    rng = random.Random(seed)
    names = ["a", "Z", "7", "customer_support", "Magicoder_v2", "org.model-7B", "a..b", "x" * 128]
    for _ in range(count):
        length = rng.choice([1, 2, 3, rng.randint(4, 127), 128])
        if length == 1:
            names.append(rng.choice(EDGE))
            continue
        middle = "".join(rng.choice(INNER) for _ in range(length - 2))
        names.append(rng.choice(EDGE) + middle + rng.choice(EDGE))
    return names


def spec(name: str) -> LoraAdapterSpec:
    return LoraAdapterSpec.model_validate(
        {"baseModel": "tiny", "source": "file:///adapters/a", "servedName": name}
    )


@pytest.mark.parametrize("seed", range(4))
def test_every_valid_served_name_is_accepted_by_the_runtime(seed: int) -> None:
    for name in valid_names(500, seed):
        assert re.fullmatch(ADAPTER_NAME, name), name
        spec(name)  # the API accepts it...
        assert check_name(name) == name  # ...and so does every runtime pod


@pytest.mark.parametrize("name", ["", "_x", "x_", "-x", "x.", "a/b", "a b", "é", "x" * 129])
def test_names_the_api_refuses_the_runtime_refuses_too(name: str) -> None:
    with pytest.raises(ValidationError):
        spec(name)
    with pytest.raises(InvalidName, match="is not valid"):
        check_name(name)
    assert adapter_name_problem(name) is not None


def test_adapter_names_default_to_metadata_name_and_those_are_valid_too() -> None:
    adapter = LoraAdapter.model_validate(
        {
            "metadata": {"name": "sql-expert"},
            "spec": {"baseModel": "tiny", "source": "file:///adapters/a"},
        }
    )
    assert adapter_name_problem(adapter.served_name) is None


def test_the_crd_publishes_the_same_name_grammar() -> None:
    crd = next(c for c in all_crds().values() if c["spec"]["names"]["kind"] == "LoraAdapter")
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    served = props["spec"]["properties"]["servedName"]
    assert served["pattern"] == ADAPTER_NAME and served["maxLength"] == SERVED_NAME_MAX


def test_every_dtype_maps_to_a_runtime_flag() -> None:
    assert set(RUNTIME_DTYPE) == set(Dtype)
    assert all(TORCH_DTYPES[flag].is_floating_point for flag in RUNTIME_DTYPE.values())


def test_every_runtime_state_maps_to_a_replica_state() -> None:
    assert set(REPLICA_STATE) == set(RuntimeAdapterState)


def test_credential_keys_are_those_docs_promise() -> None:
    assert credential_keys_for("hf://org/name") == ("HF_TOKEN",)
    assert credential_keys_for("https://host/x") == ("BEARER_TOKEN",)
    assert "AWS_SECRET_ACCESS_KEY" in credential_keys_for("s3://bucket/x")
    assert credential_keys_for("file:///x") == ()
    # The LoraAdapter docs name every key (kubectl explain shows them).
    doc = LoraAdapterSpec.model_fields["secret_ref"].description or ""
    assert all(key in doc for key in CREDENTIAL_KEYS)
