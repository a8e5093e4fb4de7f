"""Choosing a pod: one that holds the adapter with the fewest outstanding requests, else any."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from router_objects import BASE, adapter, base_model, pod

from loraplane.router.choice import Target, choose, requested_model, resolve
from loraplane.router.errors import Api
from loraplane.router.table import Table

SQL = Target("sql", "sql")


def table(pods: dict[str, bool], holders: dict[str, tuple[str, ...]]) -> Table:
    """pods: name -> ready; holders: adapter -> pods its status lists as Loaded."""
    t = Table(BASE)
    t.set_base(base_model())
    for i, (name, ready) in enumerate(sorted(pods.items())):
        t.put_pod(pod(name, f"10.0.0.{i + 1}", ready=ready))
    for name, on in holders.items():
        t.put_adapter(adapter(name, on))
    return t


def test_resolve_names_the_base_an_adapter_or_nothing() -> None:
    t = table({}, {"sql": ()})
    for base_name in (None, "", BASE, "hf://org/tiny"):
        assert resolve(t, base_name) == Target(BASE, None)
    assert resolve(t, "sql") == SQL
    assert resolve(t, "nope") is None


def test_a_holder_wins_over_a_less_busy_pod_that_lacks_the_adapter() -> None:
    t = table({"a": True, "b": True, "c": True}, {"sql": ("b", "c")})
    choice = choose(t, SQL, {"a": 0, "b": 5, "c": 3})
    assert choice is not None and choice.pod.name == "c" and choice.hit


def test_a_holder_that_is_not_ready_is_not_chosen() -> None:
    t = table({"a": True, "b": False}, {"sql": ("b",)})
    choice = choose(t, SQL, {})
    assert choice is not None and choice.pod.name == "a" and not choice.hit


def test_the_base_goes_to_the_least_busy_pod_and_ties_rotate() -> None:
    t = table({"a": True, "b": True, "c": True}, {})
    base = Target(BASE, None)
    assert choose(t, base, {"a": 2, "b": 1, "c": 1}, turn=0).pod.name == "b"
    assert choose(t, base, {"a": 2, "b": 1, "c": 1}, turn=1).pod.name == "c"
    picked = {choose(t, base, {}, turn=i).pod.name for i in range(3)}
    assert picked == {"a", "b", "c"}


def test_excluded_pods_are_never_chosen_and_none_ready_is_none() -> None:
    t = table({"a": True, "b": True}, {"sql": ("a",)})
    choice = choose(t, SQL, {}, exclude=["a"])
    assert choice is not None and choice.pod.name == "b" and not choice.hit
    assert choose(t, SQL, {}, exclude=["a", "b"]) is None
    assert choose(table({"a": False}, {"sql": ("a",)}), SQL, {}) is None
    assert choose(table({}, {}), Target(BASE, None), {}) is None


names = st.sampled_from(["p0", "p1", "p2", "p3", "p4"])


@settings(max_examples=300, deadline=None)
@given(
    pods=st.dictionaries(names, st.booleans(), max_size=5),
    holders=st.frozensets(names),
    outstanding=st.dictionaries(names, st.integers(0, 4)),
    exclude=st.frozensets(names),
    turn=st.integers(0, 10),
)
def test_choose_agrees_with_brute_force(pods, holders, outstanding, exclude, turn) -> None:
    t = table(pods, {"sql": tuple(sorted(holders))})
    got = choose(t, SQL, outstanding, exclude, turn)
    ready = [p for p, r in sorted(pods.items()) if r and p not in exclude]
    if not ready:
        assert got is None
        return
    # Brute force: rank every ready pod by (lacks the adapter, outstanding), keep the best.
    rank = {p: (p not in holders, outstanding.get(p, 0)) for p in ready}
    best = min(rank.values())
    ties = sorted(p for p in ready if rank[p] == best)
    assert got is not None
    assert got.pod.name == ties[turn % len(ties)]
    assert got.hit == (got.pod.name in holders)


def test_requested_model_reads_each_apis_field() -> None:
    assert requested_model(Api.OPENAI, {"model": "sql", "prompt": "x"}) == "sql"
    assert requested_model(Api.OPENAI, {"prompt": "x"}) is None
    assert requested_model(Api.TGI, {"inputs": "x", "parameters": {"adapter_id": "sql"}}) == "sql"
    assert requested_model(Api.TGI, {"inputs": "x"}) is None
    assert requested_model(Api.TGI, {"inputs": "x", "parameters": None}) is None
    for api, body in itertools.product(Api, ([1], "x", None)):
        with pytest.raises(ValueError, match="JSON object"):
            requested_model(api, body)
    with pytest.raises(ValueError, match="model: must be a string"):
        requested_model(Api.OPENAI, {"model": 3})
    with pytest.raises(ValueError, match="adapter_id: must be a string"):
        requested_model(Api.TGI, {"parameters": {"adapter_id": ["x"]}})
    with pytest.raises(ValueError, match="parameters: must be an object"):
        requested_model(Api.TGI, {"parameters": "x"})
