"""The hold queue: bounded, released in arrival order when a pod can take a hold, timed out."""

from __future__ import annotations

import asyncio

import pytest

from loraplane.router.choice import Target
from loraplane.router.holds import HoldQueue, Outcome

SQL, POET = Target("sql", "sql"), Target("poet", "poet")


async def test_admits_up_to_its_capacity_and_counts_per_target() -> None:
    changes: list[tuple[str, int]] = []
    q = HoldQueue(2, on_change=lambda label, n: changes.append((label, n)))
    a, b = q.admit(SQL), q.admit(POET)
    assert a is not None and b is not None
    assert q.admit(SQL) is None  # full
    assert q.held() == {"sql": 1, "poet": 1} and len(q) == 2
    assert changes == [("sql", 1), ("poet", 1)]


async def test_release_lets_go_only_what_can_go_oldest_first() -> None:
    q = HoldQueue(10)
    first, second, other = q.admit(SQL), q.admit(SQL), q.admit(POET, tried={"p1": 3})
    order: list[str] = []
    for name, hold in (("first", first), ("second", second), ("other", other)):
        hold.released.add_done_callback(lambda _, n=name: order.append(n))
    assert q.release(lambda h: h.target == SQL) == 2
    await asyncio.sleep(0)  # let the done callbacks run
    assert order == ["first", "second"]
    assert q.held() == {"poet": 1}
    assert other.tried == {"p1": 3}
    assert q.release(lambda h: "p1" not in h.tried) == 0
    assert q.release(lambda h: True) == 1 and len(q) == 0


async def test_wait_ends_released_timed_out_or_gone_and_stops_counting() -> None:
    q = HoldQueue(10)
    hold = q.admit(SQL)
    waiting = asyncio.ensure_future(q.wait(hold, timeout=30))
    await asyncio.sleep(0)
    q.release(lambda h: True)
    assert await waiting is Outcome.RELEASED

    late = q.admit(SQL)
    assert await q.wait(late, timeout=0.01) is Outcome.TIMEOUT
    assert q.held() == {}

    left = q.admit(SQL)
    gone = asyncio.get_running_loop().create_future()
    waiting = asyncio.ensure_future(q.wait(left, timeout=30, gone=gone))
    await asyncio.sleep(0)
    gone.set_result(None)
    assert await waiting is Outcome.GONE
    assert len(q) == 0 and q.held() == {}


async def test_a_release_that_lands_with_the_timeout_still_counts_as_released() -> None:
    q = HoldQueue(1)
    hold = q.admit(SQL)
    hold.released.set_result(None)  # released, then the wait finds its time already up
    assert await q.wait(hold, timeout=0) is Outcome.RELEASED


def test_a_queue_needs_room() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        HoldQueue(0)
