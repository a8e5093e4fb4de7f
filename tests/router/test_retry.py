"""Retry rules: once, on another pod, only before any byte went to the client."""

from __future__ import annotations

import json

import pytest

from loraplane.router.retry import MAX_ATTEMPTS, Failure, Step, next_step, refusal_failure

POD_GONE = (Failure.UNREACHABLE, Failure.BROKEN, Failure.DRAINING)


@pytest.mark.parametrize("failure", POD_GONE)
def test_a_pod_that_failed_before_answering_is_retried_once_elsewhere(failure: Failure) -> None:
    assert next_step(failure, attempts=1, another_ready=True) is Step.RETRY
    assert next_step(failure, attempts=1, another_ready=False) is Step.HOLD
    assert next_step(failure, attempts=MAX_ATTEMPTS, another_ready=True) is Step.ANSWER


@pytest.mark.parametrize("another_ready", [True, False])
def test_nothing_is_sent_twice_once_bytes_went_out(another_ready: bool) -> None:
    assert next_step(Failure.CUT, attempts=1, another_ready=another_ready) is Step.ANSWER


def test_a_full_queue_tries_another_pod_but_never_waits_for_one() -> None:
    assert next_step(Failure.OVERLOADED, attempts=1, another_ready=True) is Step.RETRY
    assert next_step(Failure.OVERLOADED, attempts=1, another_ready=False) is Step.ANSWER


def test_a_timeout_is_not_retried_the_pod_may_still_be_generating() -> None:
    assert next_step(Failure.TIMEOUT, attempts=1, another_ready=True) is Step.ANSWER


def openai(code: str) -> bytes:
    return json.dumps(
        {"error": {"message": "m", "type": "t", "param": None, "code": code}}
    ).encode()


def test_refusals_that_mean_the_pod_is_going_or_full() -> None:
    assert refusal_failure(503, openai("shutting_down")) is Failure.DRAINING
    tgi = json.dumps({"error": "m", "error_type": "shutting_down"}).encode()
    assert refusal_failure(503, tgi) is Failure.DRAINING
    assert refusal_failure(429, openai("overloaded")) is Failure.OVERLOADED
    # A failed adapter's 503 is the client's answer: another pod would say the same.
    assert refusal_failure(503, openai("adapter_failed")) is None
    assert refusal_failure(503, b"not json") is None
    assert refusal_failure(503, b"[1]") is None
    assert refusal_failure(404, openai("model_not_found")) is None
    assert refusal_failure(200, b"{}") is None
