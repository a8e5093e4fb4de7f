"""When a request that failed on one pod goes to another: once, and never after bytes went out.

A generation has no side effect but its cost, so running it again elsewhere is safe as long as
the client has seen nothing of the first try. Once a byte went to the client, the answer is
that pod's, whole or cut: a second answer would arrive glued to part of the first.
"""

from __future__ import annotations

import json
from enum import StrEnum

from loraplane.api.wire import AdapterErrorCode

MAX_ATTEMPTS = 2
"""The first try and one retry on another pod."""


class Failure(StrEnum):
    """How a try on one pod failed, before or after its answer began."""

    UNREACHABLE = "unreachable"
    """The connection was refused or timed out: the pod got nothing."""
    BROKEN = "broken"
    """The connection broke before the pod's answer began (a pod killed or restarting)."""
    DRAINING = "draining"
    """The pod answered 503 shutting_down: it refused the request and is going away."""
    OVERLOADED = "overloaded"
    """The pod answered 429: its queue is full."""
    TIMEOUT = "timeout"
    """The pod took the request and was silent for the read timeout: it may still be working."""
    CUT = "cut"
    """The answer broke off after bytes went to the client."""


class Step(StrEnum):
    RETRY = "retry"
    """Send it to another ready pod now."""
    HOLD = "hold"
    """No other pod is ready: hold the request until one is (or the hold times out)."""
    ANSWER = "answer"
    """Give the client this failure (the pod's own answer, when it gave one)."""


# Failures of the pod rather than the request: another pod should do better.
_POD_GONE = frozenset({Failure.UNREACHABLE, Failure.BROKEN, Failure.DRAINING})


def next_step(failure: Failure, attempts: int, another_ready: bool) -> Step:
    """What to do after `attempts` tries, the last of which failed this way; `another_ready`:
    a ready pod not tried yet could take it now."""
    if failure is Failure.CUT or attempts >= MAX_ATTEMPTS:
        return Step.ANSWER
    if failure in _POD_GONE:
        return Step.RETRY if another_ready else Step.HOLD
    if failure is Failure.OVERLOADED and another_ready:
        return Step.RETRY  # a full queue is a busy pod, not a gone one: no waiting for another
    return Step.ANSWER  # a timeout may still be generating; a second one would double the cost


def refusal_failure(status: int, body: bytes) -> Failure | None:
    """The failure a pod's refusal stands for; None when the answer is the client's to see."""
    if status == 429:
        return Failure.OVERLOADED
    if status == 503 and _error_code(body) == AdapterErrorCode.SHUTTING_DOWN:
        return Failure.DRAINING
    return None


def _error_code(body: bytes) -> str | None:
    """error.code (OpenAI's shape) or error_type (TGI's) of a refusal's body."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    error = parsed.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        return code if isinstance(code, str) else None
    code = parsed.get("error_type")
    return code if isinstance(code, str) else None
