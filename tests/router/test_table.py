"""The router's table from the resources: which pods take requests, which hold each adapter."""

from __future__ import annotations

from router_objects import BASE, adapter, base_model, pod

from loraplane.router.table import Table, adapter_of, backend_of


def test_only_ready_pods_with_an_address_not_being_deleted_take_requests() -> None:
    assert backend_of(pod("a", "10.1.0.5", port=9000), 8000).url == "http://10.1.0.5:9000"
    assert backend_of(pod("a", ready=False), 8000) is None
    assert backend_of(pod("a", deleting=True), 8000) is None  # Ready through its grace period
    assert backend_of(pod("a", ip=""), 8000) is None
    bare = pod("a")
    bare["spec"] = {}
    assert backend_of(bare, 8123).port == 8123  # the base's port when the pod names none


def test_residency_is_the_loaded_rows_and_only_of_this_base() -> None:
    route = adapter_of(adapter("sql", ("p1", "p2"), loading_on=("p3",)), BASE)
    assert route is not None
    assert route.holders == {"p1", "p2"} and route.ready and route.served_name == "sql"
    assert route.root == "https://example.com/sql?***"  # never a presigned query
    assert adapter_of(adapter("sql", ("p1",), base="other"), BASE) is None
    assert adapter_of(adapter("sql", ("p1",), deleting=True), BASE) is None
    assert adapter_of(adapter("poet", served="Poet_v2"), BASE).served_name == "Poet_v2"


def test_an_unreadable_adapter_is_skipped_not_fatal() -> None:
    broken = adapter("sql", ("p1",))
    broken["status"]["replicas"][0]["state"] = "Teleported"
    assert adapter_of(broken, BASE) is None


def test_table_follows_events() -> None:
    t = Table(BASE)
    t.set_base(base_model(port=8000))
    t.set_pods([pod("p1", "10.0.0.1"), pod("p2", "10.0.0.2", ready=False)])
    assert set(t.backends) == {"p1"} and t.starting == {"p2"}
    t.put_pod(pod("p2", "10.0.0.2"))
    assert set(t.backends) == {"p1", "p2"} and not t.starting
    t.put_pod(pod("p1", "10.0.0.1", deleting=True))
    assert set(t.backends) == {"p2"} and not t.starting  # going away: not starting either
    t.drop_pod("p1")
    assert set(t.backends) == {"p2"}

    t.set_adapters([adapter("sql", ("p1",)), adapter("other-base", ("p1",), base="x")])
    assert t.serves("sql") and not t.serves("other-base")
    t.put_adapter(adapter("sql", ("p1", "p2")))
    assert t.holders("sql") == {"p1", "p2"}
    t.drop_adapter("sql")
    assert not t.serves("sql")


def test_two_adapters_with_one_served_name_are_held_by_either() -> None:
    t = Table(BASE)
    t.set_adapters([adapter("a", ("p1",), served="same"), adapter("b", ("p2",), served="same")])
    assert t.holders("same") == {"p1", "p2"}
    t.drop_adapter("a")
    assert t.holders("same") == {"p2"}
    t.drop_adapter("b")
    assert not t.serves("same")


def test_base_names_and_ready_adapters_for_v1_models() -> None:
    t = Table(BASE)
    t.set_base(base_model())
    assert t.is_base(None) and t.is_base("") and t.is_base(BASE) and t.is_base("hf://org/tiny")
    assert not t.is_base("sql")
    assert t.base.root == "hf://org/tiny@main"
    t.set_adapters([adapter("b-ready", ("p1",)), adapter("a-loading", ready=False)])
    assert [a.served_name for a in t.ready_adapters()] == ["b-ready"]


def test_a_pod_is_admitted_anew_only_after_being_out_of_service() -> None:
    t = Table(BASE)
    t.put_pod(pod("p1"))
    first = t.admitted["p1"]
    t.put_pod(pod("p1"))  # a status update while it serves
    assert t.admitted["p1"] == first
    t.put_pod(pod("p1", ready=False))  # its runtime restarted: the gate closed
    assert "p1" not in t.admitted
    t.put_pod(pod("p1"))
    assert t.admitted["p1"] != first


def test_a_port_change_of_the_base_moves_pods_that_name_none() -> None:
    t = Table(BASE)
    bare = pod("p1")
    bare["spec"] = {}
    t.put_pod(bare)
    t.set_base(base_model(port=9000))
    assert t.backends["p1"].port == 9000
