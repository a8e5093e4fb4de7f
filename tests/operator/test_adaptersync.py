"""The sync plan, the per-pod rows and the readiness-gate rule, against hand-made pod answers."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

from loraplane.api import AdapterState, LoraAdapter
from loraplane.api.wire import AdapterErrorCode, AdapterInfo, RuntimeAdapterState
from loraplane.operator.adaptersync import (
    BACKOFF_MAX_SECONDS,
    DesiredAdapter,
    Failure,
    GateView,
    established,
    gate_is_stale,
    gate_may_open,
    plan_pod,
    replica_row,
)

SHA = "ab" * 32


def want(name: str, source: str | None = None, sha256: str | None = None, **spec) -> DesiredAdapter:
    return DesiredAdapter.of(
        LoraAdapter.model_validate(
            {
                "metadata": {"name": name, "generation": 1},
                "spec": {
                    "baseModel": "b",
                    "source": source or f"file:///a/{name}",
                    **({"sha256": sha256} if sha256 else {}),
                    **spec,
                },
            }
        )
    )


def info(d: DesiredAdapter, state: str = "loaded", **kw) -> AdapterInfo:
    return AdapterInfo(
        name=d.served_name,
        source=d.source,
        revision=d.revision,
        sha256=kw.pop("sha256", SHA),
        state=RuntimeAdapterState(state),
        **kw,
    )


def test_loads_what_is_missing_and_unloads_what_nobody_wants() -> None:
    a, b = want("a"), want("b")
    stray = AdapterInfo(name="stray", source="file:///x", state=RuntimeAdapterState.LOADED)
    plan = plan_pod({"a": a, "b": b}, {"a": info(a), "stray": stray}, {}, now=0)
    assert plan.loads == (b,) and plan.unloads == ("stray",)


def test_nothing_to_do_when_the_pod_holds_everything_or_is_loading_it() -> None:
    a, b = want("a"), want("b")
    assert not plan_pod({"a": a, "b": b}, {"a": info(a), "b": info(b, "loading")}, {}, now=0)


def test_a_changed_source_or_digest_loads_again() -> None:
    old = want("a", "file:///v1")
    new_source = want("a", "file:///v2")
    new_digest = want("a", "file:///v1", sha256="cd" * 32)
    assert plan_pod({"a": new_source}, {"a": info(old)}, {}, 0).loads == (new_source,)
    assert plan_pod({"a": new_digest}, {"a": info(old)}, {}, 0).loads == (new_digest,)
    # A pod reporting the digest in upper case holds the same weights.
    pinned = want("a", "file:///v1", sha256=SHA)
    assert not plan_pod({"a": pinned}, {"a": info(old, sha256=SHA.upper())}, {}, 0)


def test_a_failed_entry_on_the_pod_is_loaded_again() -> None:
    a = want("a")
    assert plan_pod({"a": a}, {"a": info(a, "failed", error="disk")}, {}, 0).loads == (a,)


def test_failures_back_off_exponentially_and_permanent_ones_wait_for_a_change() -> None:
    a = want("a")
    f = None
    delays = []
    for attempt in range(12):
        f = Failure.after(f, a, AdapterErrorCode.SOURCE_UNREACHABLE, "down", now=100.0)
        delays.append(f.retry_at - 100.0)
        assert f.attempts == attempt + 1
    assert delays[:4] == [2.0, 4.0, 8.0, 16.0] and delays[-1] == BACKOFF_MAX_SECONDS
    assert not plan_pod({"a": a}, {}, {"a": f}, now=100.0 + delays[-1] - 1)
    assert plan_pod({"a": a}, {}, {"a": f}, now=100.0 + delays[-1]).loads == (a,)

    refused = Failure.after(None, a, AdapterErrorCode.INCOMPATIBLE, "rank", now=0)
    assert refused.permanent
    assert not plan_pod({"a": a}, {}, {"a": refused}, now=10**9)
    changed = want("a", "file:///fixed")
    assert plan_pod({"a": changed}, {}, {"a": refused}, now=0).loads == (changed,)


def test_rows_show_what_the_pod_reports() -> None:
    a = want("a")
    loaded_at = datetime(2026, 1, 1, tzinfo=UTC)
    assert replica_row("p", a, info(a, loaded_at=loaded_at), None).state == AdapterState.LOADED
    assert replica_row("p", a, info(a, loaded_at=loaded_at), None).loaded_at == loaded_at
    assert replica_row("p", a, info(a, "loading"), None).state == AdapterState.LOADING
    assert replica_row("p", a, None, None).state == AdapterState.PENDING
    f = Failure.after(None, a, "checksum_mismatch", "x" * 5000, 0)
    row = replica_row("p", a, None, f)
    assert row.state == AdapterState.FAILED and len(row.message or "") <= 1000
    other = want("a", "file:///other")
    assert replica_row("p", a, info(other), None).state == AdapterState.PENDING


def pod(
    name: str, open_: bool, held: list[DesiredAdapter], failed: list[DesiredAdapter] = ()
) -> GateView:
    return GateView(
        name,
        open_,
        {d.served_name: info(d) for d in held},
        {d.served_name: Failure.after(None, d, "incompatible", "no", 0) for d in failed},
    )


def test_a_new_pod_opens_once_it_tried_everything_and_holds_what_serving_pods_hold() -> None:
    a, b, c = want("a"), want("b"), want("c")
    desired = [a, b, c]
    # A fresh fleet: c fails everywhere, so it keeps nobody out of service.
    fresh = pod("p0", False, [a, b], failed=[c])
    assert gate_may_open(fresh, desired, established(desired, [fresh])) == (True, "")
    still_loading = pod("p0", False, [a])
    ok, why = gate_may_open(still_loading, desired, set())
    assert not ok and "b" in why
    # A base change: old pods hold c, the new pod refuses it, so it stays out.
    old = pod("old", True, [a, b, c])
    new = pod("new", False, [a, b], failed=[c])
    ok, why = gate_may_open(new, desired, established(desired, [old, new]))
    assert not ok and "c" in why


def test_gate_rule_against_brute_force() -> None:
    """Open iff every adapter is held, or failed here and held by no serving pod."""
    adapters = [want(n) for n in "abc"]
    for held_mask, failed_mask, serving_mask in itertools.product(range(8), range(8), range(8)):
        held = [d for i, d in enumerate(adapters) if held_mask >> i & 1]
        failed = [d for i, d in enumerate(adapters) if failed_mask >> i & 1 and d not in held]
        serving = pod("s", True, [d for i, d in enumerate(adapters) if serving_mask >> i & 1])
        new = pod("n", False, held, failed)
        ok, _ = gate_may_open(new, adapters, established(adapters, [serving, new]))
        expected = all(
            d in held or (d in failed and not serving_mask >> i & 1) for i, d in enumerate(adapters)
        )
        assert ok == expected, (held_mask, failed_mask, serving_mask)


def test_a_container_started_after_the_gate_opened_makes_the_gate_stale() -> None:
    t0 = datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)
    t1 = datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC)
    assert gate_is_stale(t0, t1)
    assert not gate_is_stale(t1, t0)
    assert not gate_is_stale(t0, t0)  # one second resolution: opened as it started
    assert not gate_is_stale(None, t1)


def test_the_older_adapter_keeps_a_contested_served_name() -> None:
    from loraplane.operator.bodies import desired_adapters
    from loraplane.operator.status import Reason

    def body(name: str, created: str, **spec) -> dict:
        return {
            "metadata": {"name": name, "creationTimestamp": created, "generation": 1},
            "spec": {"baseModel": "b", "source": f"file:///a/{name}", **spec},
        }

    desired, blocked = desired_adapters(
        [
            body("new", "2026-01-02T00:00:00Z", servedName="shared"),
            body("old", "2026-01-01T00:00:00Z", servedName="shared"),
            body("solo", "2026-01-03T00:00:00Z"),
            {
                **body("gone", "2026-01-01T00:00:00Z"),
                "metadata": {"name": "gone", "deletionTimestamp": "x"},
            },
        ],
        "b",
    )
    assert set(desired) == {"shared", "solo"} and desired["shared"].name == "old"
    assert blocked["new"][0] == Reason.SERVED_NAME_CONFLICT and "'old'" in blocked["new"][1]


def test_a_pod_reporting_a_redacted_source_holds_the_adapter() -> None:
    a = want("a", "https://host.example/adapters/a?X-Amz-Signature=secret")
    reported = AdapterInfo(
        name="a",
        source="https://host.example/adapters/a?***",
        sha256=SHA,
        state=RuntimeAdapterState.LOADED,
    )
    assert a.held_by(reported)
    assert not plan_pod({"a": a}, {"a": reported}, {}, 0)
